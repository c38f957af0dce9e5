"""TensorIpcSender / TensorIpcReceiver: ids, drain-and-buffer, stale discarding, bounded waits."""

from __future__ import annotations

import time

import pytest
import torch

from dpinfer.transport.tensor_queue import (
    TensorIpcReceiver,
    TensorIpcSender,
    TensorQueueError,
    new_tensor_queue,
)


@pytest.fixture
def queue() -> object:
    q = new_tensor_queue()
    yield q
    q.close()
    q.join_thread()


def test_out_of_order_requests_are_buffered_and_stale_ones_dropped(queue: object) -> None:
    a, b = TensorIpcSender(queue), TensorIpcSender(queue)
    receiver = TensorIpcReceiver(queue, get_timeout_s=10.0)
    handles = []
    for message in range(3):
        a.new_message()
        handles.append([a(torch.full((4,), 10.0 * message + i)) for i in range(2)])
    b.new_message()
    from_b = b(torch.full((4,), -1.0))
    assert from_b.sender_id != handles[0][0].sender_id
    # Ask for the last message of `a` first: everything before it is drained and buffered.
    assert receiver(handles[1][1])[0].item() == 11.0
    assert receiver(from_b)[0].item() == -1.0  # another sender's buffer is untouched
    # Message 0 of `a` was skipped: moving to message 1 made it stale, and it is gone.
    assert receiver.num_stale == 2
    assert receiver(handles[1][0])[0].item() == 10.0
    assert receiver(handles[2][0])[0].item() == 20.0
    receiver.get_timeout_s = 0.2
    t0 = time.monotonic()
    with pytest.raises(TensorQueueError):
        receiver(handles[0][0])  # stale: never delivered, and the wait is bounded
    assert time.monotonic() - t0 < 5.0


def test_sender_snapshot_is_private(queue: object) -> None:
    sender, receiver = TensorIpcSender(queue), TensorIpcReceiver(queue, get_timeout_s=10.0)
    x = torch.zeros(8)
    sender.new_message()
    handle = sender(x)
    x += 5  # the caller's later edits must not reach the receiver
    assert not x.is_shared()
    assert torch.equal(receiver(handle), torch.zeros(8))


def put_and_exit(queue: object, conn: object) -> None:
    sender = TensorIpcSender(queue)
    sender.new_message()
    conn.send(sender(torch.ones(1000)))
    sender.close(close_queue=True)  # flushed; then this process exits


def test_sender_gone_before_get_is_an_error_not_a_crash(queue: object) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=put_and_exit, args=(queue, child))
    proc.start()
    assert parent.poll(60)
    handle = parent.recv()
    proc.join(60)
    assert proc.exitcode == 0
    receiver = TensorIpcReceiver(queue, get_timeout_s=5.0)
    with pytest.raises(TensorQueueError, match="gone"):
        receiver(handle)
