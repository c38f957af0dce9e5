"""SchedulerProcess shell driven through its real sockets, with a fake in-process scheduler."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from dpinfer.config import LocalSocket, TransportConfig, ipc_address
from dpinfer.protocol import ControlAck, EngineControl, EngineState, LoadStats, RankAck, Signal
from dpinfer.protocol import local as m
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.protocol.messages import RankMetrics
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.cache_keys import CacheKeyTracker
from dpinfer.scheduler.process import IdleSleeper, SchedulerProcess
from dpinfer.transport.channel import make_receiver, make_sender

DEADLINE_S = 10.0


class FakeScheduler:
    """Generates token 10+i for step i; a request finishes after ``max_new_tokens`` tokens."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[TokenizedRequest, int]] = {}
        self.state = EngineState.RUNNING
        self.calls: list[str] = []
        self.num_steps = 0
        self.kv = SimpleNamespace(cache_keys=CacheKeyTracker())  # what cache reports read

    @property
    def paused(self) -> bool:
        return self.state in (EngineState.PAUSED, EngineState.SUSPENDED)

    @property
    def has_work(self) -> bool:
        return bool(self.running) and not self.paused

    def add_request(self, req: TokenizedRequest) -> list[SchedulerOutput]:
        if req.input_ids == [666]:
            raise RuntimeError("bad request")
        self.running[req.request_id] = (req, 0)
        return []

    def abort_request(self, rid: int) -> list[SchedulerOutput]:
        if self.running.pop(rid, None) is None:
            return []
        return [SchedulerOutput(rid, [], True, "abort")]

    def abort_all(self, reason: str) -> list[SchedulerOutput]:
        return [out for rid in list(self.running) for out in self.abort_request(rid)]

    def step(self) -> list[SchedulerOutput]:
        self.num_steps += 1
        outs = []
        for rid, (req, n) in list(self.running.items()):
            n += 1
            done = n >= req.sampling.max_new_tokens
            outs.append(SchedulerOutput(rid, [10 + n], done, "length" if done else None, prompt_len=1))
            if done:
                del self.running[rid]
            else:
                self.running[rid] = (req, n)
        return outs

    def load(self) -> LoadStats:
        return LoadStats(0, len(self.running), len(self.running), 100, 100)

    def metrics(self) -> RankMetrics:
        return RankMetrics(generation_tokens=self.num_steps)

    def pause(self) -> None:
        self.state = EngineState.PAUSED
        self.calls.append("pause")

    def unpause(self) -> None:
        self.state = EngineState.RUNNING
        self.calls.append("unpause")

    def suspend(self) -> None:
        self.state = EngineState.SUSPENDED
        self.calls.append("suspend")

    def resume(self) -> None:
        self.state = EngineState.PAUSED
        self.calls.append("resume")

    def update_weights(self, path: str) -> None:
        if path == "bad":
            raise FileNotFoundError("no model at bad")
        self.calls.append(f"update_weights:{path}")


class Harness:
    def __init__(self, ipc_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DPINFER_IPC_DIR", ipc_dir)
        self.ctx = zmq.Context()
        self.fake = FakeScheduler()
        self.addr_in = ipc_address("t", 0, LocalSocket.SCHEDULER_IN)
        self.receiver = make_receiver(TransportConfig(), self.addr_in, "t", 0, self.ctx)
        self.recv_control = self.ctx.socket(zmq.PULL)
        self.recv_control.bind(ipc_address("t", 0, LocalSocket.SCHEDULER_CONTROL))
        self.detok = self.ctx.socket(zmq.PULL)
        self.detok.bind(ipc_address("t", 0, LocalSocket.DETOKENIZER_IN))
        send_to_detok = self.ctx.socket(zmq.PUSH)
        send_to_detok.connect(ipc_address("t", 0, LocalSocket.DETOKENIZER_IN))
        self.proc = SchedulerProcess(self.fake, self.receiver, self.recv_control, send_to_detok)
        self.sender = make_sender(TransportConfig(), self.addr_in, "t", 0, self.ctx)
        self.control = self.ctx.socket(zmq.PUSH)
        self.control.connect(ipc_address("t", 0, LocalSocket.SCHEDULER_CONTROL))
        self.thread = threading.Thread(target=self.proc.loop, daemon=True)
        self.thread.start()

    def request(self, rid: int, n: int = 3, stop: tuple[str, ...] = (), ids: list[int] | None = None) -> None:
        sampling = SamplingParams(max_new_tokens=n, stop=stop)
        self.sender.send(TokenizedRequest(rid, ids or [1, 2, 3], sampling, stream=True))

    def batches_until(self, predicate: Any) -> list[m.SchedulerBatch]:
        """Collect batches until ``predicate(all_batches)`` holds (fails after a deadline)."""
        got: list[m.SchedulerBatch] = []
        deadline = time.monotonic() + DEADLINE_S
        while not predicate(got):
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            assert remaining_ms > 0 and self.detok.poll(remaining_ms), f"timed out; got {got}"
            got.append(self.detok.recv_pyobj())
        return got

    def close(self) -> None:
        self.control.send_pyobj(m.Shutdown())
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), "scheduler loop did not exit on Shutdown"
        self.sender.close()
        self.receiver.close()
        for s in (self.recv_control, self.detok, self.control, self.proc.send_to_detokenizer):
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    ipc_dir = tempfile.mkdtemp(prefix="dpi", dir="/tmp")
    harness = Harness(ipc_dir, monkeypatch)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def outputs(batches: list[m.SchedulerBatch]) -> list[SchedulerOutput]:
    return [o for b in batches for o in b.outputs]


def results(batches: list[m.SchedulerBatch]) -> list[RankAck]:
    """The scheduler's acknowledgements, in order (each names this rank)."""
    acks = [a for b in batches for a in b.control_acks]
    assert all(a.ack.rank == 0 for a in acks)
    return [a.ack for a in acks]


def last_load(batches: list[m.SchedulerBatch]) -> int | None:
    loads = [b.load for b in batches if b.load is not None]
    return loads[-1].num_running if loads else None


def finished(batches: list[m.SchedulerBatch]) -> set[int]:
    return {o.request_id for o in outputs(batches) if o.finished}


def test_requests_flow_meta_first_and_one_batch_per_step(h: Harness) -> None:
    h.request(1, n=3, stop=("x",))
    h.request(2, n=2)
    # Once idle, the latest load the detokenizer saw says nothing is running.
    got = h.batches_until(lambda b: finished(b) == {1, 2} and last_load(b) == 0)
    metas = [meta for b in got for meta in b.metas]
    assert [(x.request_id, x.stop, x.prompt_tail) for x in metas] == [
        (1, ("x",), (1, 2, 3)),
        (2, (), (1, 2, 3)),
    ]
    meta_at = next(i for i, b in enumerate(got) if any(x.request_id == 1 for x in b.metas))
    output_at = next(i for i, b in enumerate(got) if any(o.request_id == 1 for o in b.outputs))
    assert meta_at <= output_at, "a request's meta must reach the detokenizer before its outputs"
    assert [o.new_token_ids for o in outputs(got) if o.request_id == 1] == [[11], [12], [13]]
    for b in got:  # one batch per step: never two outputs of one request in one batch
        ids = [o.request_id for o in b.outputs]
        assert len(ids) == len(set(ids))
    # Idle again, the scheduler reports its latest metrics (even though the load looks the same).
    latest = RankMetrics(generation_tokens=h.fake.num_steps)  # no step runs once both finished
    got += h.batches_until(lambda b: any(x.metrics == latest for x in got + b))
    reports = [(b.load, b.metrics) for b in got if b.load is not None or b.metrics is not None]
    assert all(load and metrics for load, metrics in reports), "load and metrics travel together"


def test_idle_loop_sleeps_instead_of_spinning(h: Harness) -> None:
    h.request(1, n=1)
    h.batches_until(lambda b: finished(b) == {1})
    before = h.fake.num_steps
    calls = {"n": 0}
    original = h.proc.recv_inputs

    def counting() -> None:
        calls["n"] += 1
        original()

    h.proc.recv_inputs = counting  # type: ignore[method-assign]
    threading.Event().wait(0.3)  # observe an idle period
    assert calls["n"] <= 2, f"idle loop ran {calls['n']} iterations in 0.3 s"
    assert h.fake.num_steps == before
    h.request(2, n=1)  # wakes at once on the channel socket
    h.batches_until(lambda b: finished(b) == {2})


def test_pause_unpause_and_invalid_transition(h: Harness) -> None:
    h.control.send_pyobj(EngineControl(1, Signal.PAUSE, {}))
    got = h.batches_until(lambda b: len(results(b)) == 1)
    assert next(a for b in got for a in b.control_acks) == ControlAck(
        1, Signal.PAUSE, RankAck(0, True, EngineState.PAUSED)
    )
    h.request(5, n=2)
    h.control.send_pyobj(EngineControl(2, Signal.UNPAUSE, {}))
    h.control.send_pyobj(EngineControl(3, Signal.RESUME, {}))  # invalid from running
    got = h.batches_until(lambda b: finished(b) == {5} and len(results(b)) == 2)
    ok, bad = results(got)
    assert ok.ok and ok.state == "running"
    assert not bad.ok and "cannot resume while running" in bad.error and bad.state == "running"
    assert h.fake.calls == ["pause", "unpause"]


def test_paused_scheduler_holds_requests_then_stop_drains(h: Harness) -> None:
    h.control.send_pyobj(EngineControl(1, Signal.PAUSE, {}))
    h.control.send_pyobj(EngineControl(2, Signal.SUSPEND, {}))
    h.request(7, n=2)
    got = h.batches_until(lambda b: len(results(b)) == 2 and any(b_.metas for b_ in b))
    assert not finished(got) and h.fake.num_steps == 0, "a suspended scheduler must not step"
    h.control.send_pyobj(EngineControl(-1, Signal.STOP, {"drain": True}))
    got = h.batches_until(lambda b: finished(b) == {7} and results(b))
    assert results(got)[-1].state == "stopped"
    assert h.fake.calls == ["pause", "suspend", "resume", "unpause"]


def test_abort_on_channel_update_weights_errors_and_failing_add(h: Harness) -> None:
    h.control.send_pyobj(EngineControl(1, Signal.PAUSE, {}))
    h.request(3, n=50)
    h.sender.send(m.AbortRequests((3, 99), "client"))
    h.request(4, ids=[666])
    h.control.send_pyobj(EngineControl(2, Signal.UPDATE_WEIGHTS, {"path": "bad"}))
    h.control.send_pyobj(EngineControl(3, Signal.UPDATE_WEIGHTS, {}))
    got = h.batches_until(lambda b: finished(b) == {3, 4} and len(results(b)) == 3)
    by_id = {o.request_id: o for o in outputs(got)}
    assert by_id[3].finish_reason == "abort"
    assert by_id[4].finish_reason == "error" and "bad request" in by_id[4].error
    _, bad_path, no_path = results(got)
    assert not bad_path.ok and "no model at bad" in bad_path.error and bad_path.state == "paused"
    assert not no_path.ok and "args.path" in no_path.error


def test_idle_sleeper_wakes_on_every_input() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    c, d = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://a")
        b.connect("inproc://a")
        c.bind("inproc://c")
        d.connect("inproc://c")
        sleeper = IdleSleeper([a, c])
        assert sleeper.sleep(0.01) is False
        d.send(b"x")
        t0 = time.monotonic()
        assert sleeper.sleep(5.0) is True and time.monotonic() - t0 < 1.0
        c.recv()
        b.send(b"y")
        assert sleeper.sleep(5.0) is True
    finally:
        for s in (a, b, c, d):
            s.close(linger=0)
        ctx.term()
