"""TokenizerProcess through its real sockets: ordered channel, error replies, limits, shutdown."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from dpinfer.config import LocalSocket, RankConfig, ipc_address
from dpinfer.protocol import OutputBody, pack_body
from dpinfer.protocol import local as m
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.tokenizer.process import TokenizerProcess, build_parser
from dpinfer.transport.channel import make_receiver

DEADLINE_MS = 10_000


class Harness:
    def __init__(self, config: RankConfig) -> None:
        dep = config.deployment_id
        self.ctx = zmq.Context()
        self.recv_outputs = self.ctx.socket(zmq.PULL)
        self.recv_outputs.bind(ipc_address(dep, 0, LocalSocket.RANK_OUTPUTS))
        self.channel = make_receiver(
            config.transport, ipc_address(dep, 0, LocalSocket.SCHEDULER_IN), dep, 0, self.ctx
        )
        self.proc = TokenizerProcess(config, build_parser(config), self.ctx)
        self.to_tokenizer = self.ctx.socket(zmq.PUSH)
        self.to_tokenizer.connect(ipc_address(dep, 0, LocalSocket.TOKENIZER_IN))
        self.thread = threading.Thread(target=self.proc.loop, daemon=True)
        self.thread.start()

    def send(self, *requests: tuple[int, Any]) -> None:
        raws = tuple(
            m.RawRequest(rid, rid % 2 == 0, body if isinstance(body, bytes) else pack_body(body))
            for rid, body in requests
        )
        self.to_tokenizer.send_pyobj(m.TokenizeRequests(raws))

    def channel_items(self, n: int) -> list[Any]:
        got: list[Any] = []
        while len(got) < n:
            assert self.channel.socket.poll(DEADLINE_MS), f"only {len(got)} of {n} items on the channel"
            got += self.channel.recv_ready()
        return got

    def errors(self) -> list[tuple[int, OutputBody]]:
        assert self.recv_outputs.poll(DEADLINE_MS), "no error reply"
        out = self.recv_outputs.recv_pyobj()
        assert all(e.final and e.num_tokens == 0 for e in out.entries)
        return [
            (e.request_id, OutputBody.from_bytes(b)) for e, b in zip(out.entries, out.bodies, strict=True)
        ]

    def close(self) -> None:
        self.to_tokenizer.send_pyobj(m.Shutdown())
        self.thread.join(10)
        assert not self.thread.is_alive(), "the tokenizer loop must end on Shutdown"
        self.proc.close()
        self.channel.close()
        self.recv_outputs.close(linger=0)
        self.to_tokenizer.close(linger=0)
        self.ctx.term()


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    ipc_dir = tempfile.mkdtemp(prefix="dpi", dir="/tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("DPINFER_IPC_DIR", ipc_dir)
    harness = Harness(RankConfig(deployment_id="tok"))
    try:
        yield harness
    finally:
        harness.close()
        patch.undo()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def test_good_requests_and_aborts_travel_in_order(h: Harness) -> None:
    h.send((1, {"prompt": "hi"}), (2, {"prompt": [5, 6, 7], "sampling": {"max_new_tokens": 4}}))
    h.to_tokenizer.send_pyobj(m.AbortRequests((1,), "client"))
    h.send((3, {"messages": [{"role": "user", "content": "yo"}]}))
    items = h.channel_items(4)
    assert [type(x).__name__ for x in items] == [
        "TokenizedRequest",
        "TokenizedRequest",
        "AbortRequests",
        "TokenizedRequest",
    ]
    first, second, abort, chat = items
    assert isinstance(first, TokenizedRequest) and first.input_ids == [ord("h") + 3, ord("i") + 3]
    assert first.stream is False and second.stream is True and second.sampling.max_new_tokens == 4
    assert abort == m.AbortRequests((1,), "client")
    assert chat.input_ids[-len("<|assistant|>") :] == [ord(c) + 3 for c in "<|assistant|>"]


def test_bad_requests_get_errors_and_never_reach_the_scheduler(h: Harness) -> None:
    h.send((10, {"prompt": ""}), (11, {"prompt": "fine"}), (12, b"\xc1"), (13, {"prompt": "a", "x": 1}))
    errors = dict(h.errors())
    assert sorted(errors) == [10, 12, 13]
    assert all(
        b.finish_reason == "error" and b.error and b.error.startswith("invalid request:")
        for b in errors.values()
    )
    assert all(b.error_code == "invalid_request" for b in errors.values()), "front ends map this to 400"
    assert "prompt is empty" in (errors[10].error or "") and "unknown request field(s): x" in (
        errors[13].error or ""
    )
    (ok,) = h.channel_items(1)
    assert ok.request_id == 11, "only the good request reaches the scheduler"
    assert h.proc.num_rejected >= 3


def test_set_limits_applies_to_later_requests(h: Harness) -> None:
    h.to_tokenizer.send_pyobj(m.SetLimits(4))
    h.send((20, {"prompt": "12345"}), (21, {"prompt": "1234"}))
    ((rid, body),) = h.errors()
    assert rid == 20 and "prompt has 5 tokens" in (body.error or "") and "at most 4" in (body.error or "")
    (ok,) = h.channel_items(1)
    assert ok.request_id == 21
    h.to_tokenizer.send_pyobj(m.SetLimits(2047))
