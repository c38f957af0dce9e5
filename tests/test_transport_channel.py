"""The request channel end to end across two spawned processes, in every transport mode."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest
import torch
import zmq
from transformers import BatchFeature

from dpinfer.config import TransportConfig, ipc_address, new_deployment_id
from dpinfer.transport import make_receiver, make_sender, make_tensor_queue
from dpinfer.transport.shm import list_segments

CTX = mp.get_context("spawn")
DEADLINE_S = 60.0


def describe(obj: Any) -> Any:
    """A comparable summary: container types kept, tensors as (shape, dtype, sum)."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), float(obj.double().sum()))
    if isinstance(obj, BatchFeature):
        return ("BF", {k: describe(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return {k: describe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [describe(v) for v in obj])
    return obj


def make_request(i: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(i)
    pixels = torch.randn(2, 3, 128, 128, generator=g)  # 384 KiB: over the inline limit
    return {
        "kind": "request",
        "request_id": i,
        "input_ids": list(range(i, i + 50)),
        "mm": BatchFeature({"pixel_values": pixels, "image_sizes": torch.tensor([[128, 128]] * 2)}),
        "features": [pixels.transpose(2, 3), (torch.arange(10, dtype=torch.bfloat16),)],
    }


def receiver_main(cfg: TransportConfig, address: str, dep: str, n: int, conn: Any, queue: Any) -> None:
    receiver = make_receiver(cfg, address, dep, 0, tensor_queue=queue)
    conn.send("ready")
    got: list[Any] = []
    poller = zmq.Poller()
    poller.register(receiver.socket, zmq.POLLIN)
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < n and time.monotonic() < deadline:
        if poller.poll(100):
            got.extend(receiver.recv_ready())
    conn.send([describe(o) for o in got])
    conn.send(receiver.num_dropped)
    receiver.close()


def run_pair(cfg: TransportConfig, objs: list[Any]) -> tuple[list[Any], int, dict[str, int]]:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "test-chan")
    queue = make_tensor_queue(cfg)
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=receiver_main, args=(cfg, address, dep, len(objs), child, queue))
    proc.start()
    try:
        assert parent.poll(DEADLINE_S) and parent.recv() == "ready", "receiver did not start"
        sender = make_sender(cfg, address, dep, 0, tensor_queue=queue)
        for obj in objs:
            sender.send(obj)
        stats = sender.stats()
        assert parent.poll(DEADLINE_S), "receiver did not report"
        got, dropped = parent.recv(), parent.recv()
        sender.close()
        proc.join(DEADLINE_S)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert list_segments(dep) == [], "shared memory left behind after a clean stop"
    assert not os.path.exists(address.removeprefix("ipc://")), "socket file left behind"
    return got, dropped, stats


@pytest.mark.parametrize("mode", ["zmq", "shm", "tensor_queue"])
def test_nested_tensors_and_order_across_processes(mode: str) -> None:
    cfg = TransportConfig(transport=mode, shm_region_bytes=4 << 20)
    objs: list[Any] = []
    for i in range(4):
        objs.append(make_request(i))
        objs.append({"kind": "abort", "request_id": i})
    got, dropped, stats = run_pair(cfg, objs)
    assert dropped == 0
    assert got == [describe(o) for o in objs], f"{mode}: payload or order differs"
    if mode != "zmq":
        # pixel_values and the transposed features go out of band; small tensors inline.
        assert stats["num_routed"] == 8, stats
        assert stats["num_fallbacks"] == 0, stats


def test_cpu_tensors_in_cuda_ipc_pool_mode_take_the_shm_route() -> None:
    cfg = TransportConfig(transport="shm", tensor_transport="cuda_ipc_pool", shm_region_bytes=4 << 20)
    objs = [make_request(i) for i in range(2)]
    got, dropped, stats = run_pair(cfg, objs)
    assert dropped == 0 and got == [describe(o) for o in objs]
    assert stats["num_pool"] == 0 and stats["num_pool_full"] == 0, "a CPU tensor went into a pool"
    assert stats["num_routed"] == 4, stats


def test_shm_copy_out_receiver_matches() -> None:
    cfg = TransportConfig(transport="shm", shm_region_bytes=2 << 20, shm_copy_out=True)
    objs = [make_request(i) for i in range(6)]  # more data than the region: slots must recycle
    got, dropped, stats = run_pair(cfg, objs)
    assert dropped == 0 and got == [describe(o) for o in objs]
    assert stats["num_routed"] == 12


def test_undecodable_message_is_dropped_and_counted() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "bad")
    receiver = make_receiver(TransportConfig(transport="shm", shm_region_bytes=1 << 20), address, dep, 0)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    raw.connect(address)
    sender = make_sender(TransportConfig(transport="shm"), address, dep, 0)
    try:
        raw.send(b"not a pickle")
        raw.send_multipart([b"\x80\x05K\x01.", b"also not a pickle"])
        sender.send({"after": torch.ones(100_000)})
        got: list[Any] = []
        deadline = time.monotonic() + 10
        # Two connections: no order between them, so wait for all three outcomes.
        while (not got or receiver.num_dropped < 2) and time.monotonic() < deadline:
            receiver.socket.poll(100)
            got.extend(receiver.recv_ready())
        assert len(got) == 1 and got[0]["after"].sum().item() == 100_000
        assert receiver.num_dropped == 2
    finally:
        raw.close(0)
        ctx.term()
        sender.close()
        receiver.close()
    assert list_segments(dep) == []


def test_tensor_queue_mode_needs_the_queue() -> None:
    from dpinfer.transport import TransportError

    dep = new_deployment_id()
    with pytest.raises(TransportError, match="make_tensor_queue"):
        make_sender(TransportConfig(transport="tensor_queue"), ipc_address(dep, 0, "q"), dep, 0)


def test_codec_inline_views_are_compact_and_parameters_survive() -> None:
    from dpinfer.transport.codec import TensorDecoder, TensorEncoder

    encoder, decoder = TensorEncoder(inline_bytes=256 << 10), TensorDecoder()
    big = torch.randn(1000, 1000)  # 4 MB storage
    payload, handles = encoder.dumps({"view": big[:, :3], "p": torch.nn.Parameter(torch.ones(3))})
    assert handles == [] and len(payload) < 64 << 10, "a small view pickled its whole storage"
    out = decoder.loads(payload)
    assert torch.equal(out["view"], big[:, :3])
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
