"""RankMain's loop through its real local sockets, with a fake coordinator link and fake children."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from dpinfer import protocol
from dpinfer.errors import ProtocolError
from dpinfer.protocol import EngineOutputEntry, OutputBody, Signal
from dpinfer.protocol import local as m
from dpinfer.protocol.messages import NO_METRICS, FinishCounts, RankMetrics
from dpinfer.rank import inflight
from dpinfer.rank.loop import RankMain
from dpinfer.rank.signal_wakeup import SignalWakeup

DEADLINE_S = 10.0


class FakeConn:
    """Stands in for ``EngineConnection``: messages in through ``inject``, everything out recorded."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.bind("inproc://conn")
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.connect("inproc://conn")
        self._inbox: list[protocol.Message] = []
        self._lock = threading.Lock()
        self.outputs: list[tuple[EngineOutputEntry, OutputBody]] = []
        self.acks: list[tuple[int, str, bool, str, str]] = []
        self.heartbeats: list[tuple[int, int, int, int, str]] = []
        self.heartbeat_metrics: list[RankMetrics] = []
        self.deregistered: list[str] = []
        self._next_heartbeat = 0.0
        self.cache_reports = False
        self.cache_report_msgs: list[protocol.CacheReport] = []

    def send_cache_report(self, report: protocol.CacheReport) -> None:
        self.cache_report_msgs.append(report)

    def inject(self, msg: protocol.Message) -> None:
        msg = protocol.decode(protocol.encode(msg))  # as the real connection delivers it: decoded
        with self._lock:
            self._inbox.append(msg)
        self._wake.send(b"x")

    def recv_ready(self) -> list[protocol.Message]:
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._lock:
            out, self._inbox = self._inbox, []
        return out

    def send_outputs(self, entries: Any, bodies: Any) -> None:
        self.outputs += [(e, OutputBody.from_bytes(b)) for e, b in zip(entries, bodies, strict=True)]

    def send_control_ack(self, msg: protocol.ControlAck) -> None:
        assert msg.ack.rank == 3, "every ack names this rank"
        self.acks.append((msg.control_id, msg.signal, msg.ack.ok, msg.ack.state, msg.ack.error))

    def seconds_until_heartbeat(self) -> float:
        return max(0.0, self._next_heartbeat - time.monotonic())

    def send_heartbeat(
        self, load: protocol.LoadStats, state: protocol.EngineState, metrics: RankMetrics
    ) -> None:
        self._next_heartbeat = time.monotonic() + 0.05
        self.heartbeats.append((*load[:4], state))
        self.heartbeat_metrics.append(metrics)

    def deregister(self, reason: str, handoff: bool = False) -> None:
        # As EngineConnection: the first call is the one the coordinator gets.
        if not self.deregistered:
            self.deregistered.append(reason)
            self.handoff = handoff

    def close(self) -> None:
        self.socket.close(linger=0)
        self._wake.close(linger=0)


@dataclass
class FakeProcess:
    exitcode: int | None = None

    def join(self, timeout: float | None = None) -> None:
        pass


@dataclass
class FakeChild:
    name: str
    pid: int
    process: FakeProcess = field(default_factory=FakeProcess)


class FakeSupervisor:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.child = FakeChild("detokenizer", 4242)

    def sentinels(self) -> dict[int, FakeChild]:
        return {self.read_fd: self.child}

    def kill_child(self) -> None:
        self.child.process.exitcode = -9
        os.close(self.write_fd)


class Harness:
    def __init__(self, ipc_dir: str) -> None:
        self.ctx = zmq.Context()
        addr = {name: f"ipc://{ipc_dir}/{name}" for name in ("out", "tok", "sched")}
        self.recv_outputs = self.ctx.socket(zmq.PULL)
        self.recv_outputs.bind(addr["out"])
        self.tokenizer = self.ctx.socket(zmq.PULL)
        self.tokenizer.bind(addr["tok"])
        self.scheduler = self.ctx.socket(zmq.PULL)
        self.scheduler.bind(addr["sched"])
        self.push_outputs = self.ctx.socket(zmq.PUSH)
        self.push_outputs.connect(addr["out"])
        sockets = {"recv_outputs": self.recv_outputs}
        for name, key in (("send_to_tokenizer", "tok"), ("send_to_scheduler", "sched")):
            sockets[name] = self.ctx.socket(zmq.PUSH)
            sockets[name].connect(addr[key])
        self.conn = FakeConn(self.ctx)
        self.supervisor = FakeSupervisor()
        self.main = RankMain(3, self.conn, self.supervisor, sockets)  # type: ignore[arg-type]
        self.sockets = sockets
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.main.run()

    def recv(self, sock: zmq.Socket) -> Any:
        assert sock.poll(int(DEADLINE_S * 1000)), "nothing arrived"
        return sock.recv_pyobj()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            threading.Event().wait(0.01)

    def requests(self, *ids: int, stream: bool = False) -> None:
        entries = tuple(protocol.RequestEntry(i, stream) for i in ids)
        self.conn.inject(protocol.Requests(entries, tuple(b"\x80" for _ in ids)))

    def output(
        self, rid: int, final: bool, text: str = "", results: tuple[protocol.ControlAck, ...] = ()
    ) -> None:
        body = OutputBody(text=text, finish_reason="length" if final else None).to_bytes()
        self.push_outputs.send_pyobj(m.RankOutputs((EngineOutputEntry(rid, final, 1),), (body,), results))

    def close(self) -> None:
        if self.thread.is_alive():
            if self.supervisor.child.process.exitcode is None:
                self.supervisor.kill_child()
            self.thread.join(DEADLINE_S)
        for sock in (*self.sockets.values(), self.tokenizer, self.scheduler, self.push_outputs):
            sock.close(linger=0)
        self.conn.close()
        os.close(self.supervisor.read_fd)
        self.ctx.term()


@pytest.fixture
def h() -> Iterator[Harness]:
    ipc_dir = tempfile.mkdtemp(prefix="dpi", dir="/tmp")
    harness = Harness(ipc_dir)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def test_requests_relay_and_outputs_only_for_requests_in_flight(h: Harness) -> None:
    h.requests(1, 2, stream=True)
    h.requests(2)  # duplicate id: dropped
    msg = h.recv(h.tokenizer)
    assert msg == m.TokenizeRequests((m.RawRequest(1, True, b"\x80"), m.RawRequest(2, True, b"\x80")))
    h.output(1, False, "pa")
    h.output(1, True, "full")
    h.output(1, True, "late duplicate final")  # no longer in flight: dropped
    h.output(99, True, "unknown")
    h.wait(lambda: len(h.conn.outputs) >= 2, "two outputs")
    h.output(2, True, "two")
    h.wait(lambda: len(h.conn.outputs) >= 3, "three outputs")
    assert [(e.request_id, e.final, b.text) for e, b in h.conn.outputs] == [
        (1, False, "pa"),
        (1, True, "full"),
        (2, True, "two"),
    ]
    assert not h.tokenizer.poll(50), "the duplicate must not reach the tokenizer"
    h.wait(lambda: bool(h.conn.heartbeats), "a heartbeat")
    assert h.conn.heartbeats[-1][-1] == "running"


def test_heartbeats_carry_the_schedulers_latest_metrics_whole(h: Harness) -> None:
    h.wait(lambda: bool(h.conn.heartbeat_metrics), "a heartbeat")
    assert h.conn.heartbeat_metrics[-1] == NO_METRICS, "no figures before the scheduler reports any"
    figures = RankMetrics(prompt_tokens=7, generation_tokens=3, finished=FinishCounts(stop=1))
    h.push_outputs.send_pyobj(m.RankOutputs(load=protocol.LoadStats(0, 0, 5, 95, 100), metrics=figures))
    h.wait(lambda: h.conn.heartbeat_metrics[-1] == figures, "a heartbeat with the scheduler's metrics")
    h.push_outputs.send_pyobj(m.RankOutputs(control_acks=()))  # a batch without figures keeps them
    h.output(1, True)
    h.wait(lambda: len(h.conn.heartbeat_metrics) > 3, "more heartbeats")
    assert h.conn.heartbeat_metrics[-1] == figures


def test_controls_are_forwarded_in_order_and_acks_relayed_whole(h: Harness) -> None:
    """The scheduler owns the rank's state and checks every transition; the rank main forwards
    each signal in order, relays each acknowledgement as it is, and mirrors the state."""
    with pytest.raises(ProtocolError, match=r"signal.*Invalid enum value 'explode'"):
        h.conn.inject(protocol.EngineControl(2, "explode", {}))  # type: ignore[arg-type]
    h.conn.inject(protocol.EngineControl(1, Signal.RESUME, {}))
    h.conn.inject(protocol.EngineControl(3, Signal.PAUSE, {}))
    assert h.recv(h.scheduler) == protocol.EngineControl(1, Signal.RESUME, {})
    assert h.recv(h.scheduler) == protocol.EngineControl(3, Signal.PAUSE, {})
    refused = protocol.RankAck(3, False, protocol.EngineState.RUNNING, "cannot resume while running")
    paused = protocol.RankAck(3, True, protocol.EngineState.PAUSED)
    acks = (protocol.ControlAck(1, Signal.RESUME, refused), protocol.ControlAck(3, Signal.PAUSE, paused))
    h.push_outputs.send_pyobj(m.RankOutputs(control_acks=acks))
    h.wait(lambda: len(h.conn.acks) == 2, "both acks")
    assert h.conn.acks == [
        (1, "resume", False, "running", "cannot resume while running"),
        (3, "pause", True, "paused", ""),
    ]
    h.wait(lambda: h.conn.heartbeats[-1][-1] == "paused", "a heartbeat saying paused")
    internal = protocol.ControlAck(m.INTERNAL_CONTROL_ID, Signal.SUSPEND, paused._replace(state="suspended"))
    h.push_outputs.send_pyobj(m.RankOutputs(control_acks=(internal,)))
    h.wait(lambda: h.conn.heartbeats[-1][-1] == "suspended", "a heartbeat saying suspended")
    assert len(h.conn.acks) == 2, "the rank main's own controls are never acknowledged upstream"


def test_reregistration_drops_requests_and_applies_state(h: Harness) -> None:
    h.requests(5, 6)
    h.recv(h.tokenizer)
    h.conn.inject(protocol.RegisterAck(3, "suspended", 0.5))
    assert h.recv(h.tokenizer) == m.AbortRequests((5, 6), "re-registered")
    assert h.recv(h.scheduler) == m.ReachState(protocol.EngineState.SUSPENDED)
    h.output(5, True, "stale")
    h.requests(7)
    h.recv(h.tokenizer)
    h.output(7, True, "fresh")
    h.wait(lambda: bool(h.conn.outputs), "an output")
    assert [e.request_id for e, _ in h.conn.outputs] == [7], "outputs of dropped requests are not forwarded"


def test_stop_deadline_aborts_then_fails_what_never_answers(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inflight, "ABORT_GRACE_S", 0.2)
    h.requests(1, 2)
    h.recv(h.tokenizer)
    h.conn.inject(protocol.EngineControl(9, "stop", {"drain": True, "deadline_s": 0.2}))
    assert h.recv(h.scheduler) == protocol.EngineControl(
        m.INTERNAL_CONTROL_ID, "stop", {"drain": True, "reason": "rank 3 stopped"}
    )
    h.requests(3)  # arrives while stopping: refused at once
    h.output(1, True, "drained")
    assert h.recv(h.tokenizer) == m.AbortRequests((2,), "rank 3 stopped")
    h.thread.join(DEADLINE_S)
    assert h.code == 0
    finals = {e.request_id: b for e, b in h.conn.outputs if e.final}
    assert finals[1].text == "drained"
    assert finals[2].finish_reason == "abort" and finals[2].error == "rank 3 stopped"
    assert finals[3].finish_reason == "error" and "is stopping" in (finals[3].error or "")
    assert h.conn.acks == [(9, "stop", True, "stopped", "")]
    assert h.conn.deregistered == ["stopped"]


def test_bad_stop_args_get_an_error_ack(h: Harness) -> None:
    h.conn.inject(protocol.EngineControl(1, "stop", {"drain": "yes"}))
    h.wait(lambda: bool(h.conn.acks), "an ack")
    assert h.conn.acks[0][2] is False and "drain (bool)" in h.conn.acks[0][4]
    assert h.thread.is_alive(), "a bad STOP must not stop the rank"


def test_dead_child_hands_in_flight_requests_back_and_exits_nonzero(h: Harness) -> None:
    h.requests(1, 2)
    h.recv(h.tokenizer)
    h.supervisor.kill_child()
    h.thread.join(DEADLINE_S)
    assert h.code == 1
    # The coordinator re-dispatches or migrates them: this rank sends no final of its own.
    assert h.conn.outputs == []
    assert h.conn.handoff is True
    assert "the detokenizer process (pid 4242) died unexpectedly (exit code -9)" in h.conn.deregistered[0]
    assert len(h.main.inflight) == 0


def test_sigterm_hands_in_flight_requests_back_and_exits_cleanly(h: Harness) -> None:
    h.requests(1)
    h.recv(h.tokenizer)
    # What the signal machinery does: the handler records, the wake-up fd becomes readable.
    h.main._wakeup._record(signal.SIGTERM, None)
    os.write(h.main._wakeup._write_fd, b"\x0f")
    stop = protocol.EngineControl(m.INTERNAL_CONTROL_ID, "stop", {"drain": False, "reason": "rank 3 stopped"})
    assert h.recv(h.scheduler) == stop
    assert h.recv(h.tokenizer) == m.AbortRequests((1,), "rank 3 stopped")
    h.output(1, True, "aborted")
    h.thread.join(DEADLINE_S)
    assert h.code == 0 and h.conn.deregistered == ["rank 3 terminated by signal 15"]
    assert h.conn.handoff is True, "its requests continue on other ranks"


def test_signal_wakeup_in_the_main_thread() -> None:
    wakeup = SignalWakeup()
    previous = signal.getsignal(signal.SIGTERM)
    wakeup.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        poller = zmq.Poller()
        poller.register(wakeup.fd, zmq.POLLIN)
        assert poller.poll(int(DEADLINE_S * 1000)), "the wake-up fd must become readable"
        assert wakeup.pop() == signal.SIGTERM
        assert wakeup.pop() is None
    finally:
        wakeup.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_displaced_rank_exits_and_is_not_restarted(h: Harness) -> None:
    """A rank told its id was taken over exits (never a zombie that STOP no longer reaches)."""
    from dpinfer.rank.loop import EXIT_DISPLACED

    h.requests(1, 2)
    h.recv(h.tokenizer)
    h.conn.inject(protocol.Error("rank_taken", "rank 3 was taken over by a newer registration"))
    assert h.recv(h.tokenizer) == m.AbortRequests((1, 2), "rank taken over")
    h.thread.join(DEADLINE_S)
    assert h.code == EXIT_DISPLACED
    assert h.conn.outputs == [], "the coordinator already ended these requests; nothing is sent twice"
