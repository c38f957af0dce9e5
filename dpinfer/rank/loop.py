"""The rank main's loop: relay requests in and outputs out, apply control, heartbeat, supervise.

Sockets (local ones are ``ipc://``, names from ``engine.messages``):

- ``conn.socket``: the DEALER link to the coordinator (``EngineConnection``).
- ``recv_outputs`` (PULL, binds ``rank-outputs``): ``RankOutputs`` from the detokenizer
  (outputs, control results, load, metrics) and from the tokenizer (error finals for bad requests).
- ``send_to_tokenizer`` (PUSH): requests and aborts, in coordinator order.
- ``send_to_scheduler`` (PUSH): lifecycle ``ControlCommand``\\ s.
- each child's process sentinel, and a signal wake-up pipe (SIGTERM/SIGINT).

This loop never runs the model, so heartbeats stay on time however busy the scheduler is.
Every accepted request gets exactly one final reply (see ``engine.inflight``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from dpinfer import protocol
from dpinfer.log import get_logger
from dpinfer.protocol import EngineState, FinishReason, Signal
from dpinfer.protocol import local as m
from dpinfer.protocol.codec import Frame
from dpinfer.protocol.messages import NO_METRICS
from dpinfer.rank.cache_report import CacheReporter
from dpinfer.rank.connection import EngineConnection
from dpinfer.rank.inflight import DEFAULT_STOP_DEADLINE_S, InFlight, StopPlan
from dpinfer.rank.signal_wakeup import SignalWakeup
from dpinfer.rank.supervisor import Child, Supervisor

logger = get_logger(__name__)

MAX_DRAIN = 256
EXIT_DISPLACED = 75
"""Exit code of a rank whose id a newer registration took over (EX_TEMPFAIL): never restarted."""


class RankMain:
    """The loop of one rank main; ``run_rank`` builds it once every child is ready."""

    def __init__(
        self, rank: int, conn: EngineConnection, supervisor: Supervisor, sockets: dict[str, zmq.Socket]
    ) -> None:
        self.rank = rank
        self.conn = conn
        self.supervisor = supervisor
        self.recv_outputs = sockets["recv_outputs"]
        self.send_to_tokenizer = sockets["send_to_tokenizer"]
        self.send_to_scheduler = sockets["send_to_scheduler"]
        self.state = EngineState.RUNNING
        """The scheduler's state as it last acknowledged it, for heartbeats. The scheduler owns
        the rank's lifecycle state and checks every transition; the rank main only mirrors it
        (and decides nothing but its own STOP plan)."""
        self.inflight = InFlight()
        self.load = protocol.LoadStats()
        self.metrics = NO_METRICS
        """The scheduler's latest request figures, sent whole in every heartbeat."""
        self.stop: StopPlan | None = None
        self.exit_code: int | None = None
        self.cache = CacheReporter(conn.send_cache_report, self.send_to_tokenizer)
        self.cache.registered(conn.cache_reports)
        self._sentinels = supervisor.sentinels()
        self._wakeup = SignalWakeup()
        self.poller = zmq.Poller()
        for sock in (self.recv_outputs, conn.socket, self._wakeup.fd, *self._sentinels):
            self.poller.register(sock, zmq.POLLIN)
        self._dispatch: dict[type[protocol.Message], Callable[[Any], None]] = {
            protocol.Requests: self.on_requests,
            protocol.EngineAbort: self.on_abort,
            protocol.EngineControl: self.on_control,
            protocol.RegisterAck: self.on_reregistered,
            protocol.Error: self.on_error,
        }

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Serve until STOP (returns 0) or a dead child (returns 1)."""
        self._wakeup.install()
        try:
            while self.exit_code is None:
                events = dict(self.poller.poll(self._timeout_ms()))
                if self.recv_outputs in events:
                    self.on_outputs()
                if self.conn.socket in events:
                    for msg in self.conn.recv_ready():
                        self.dispatch(msg)
                if self._wakeup.fd in events:
                    self.on_signal(self._wakeup.pop())
                dead = [child for fd, child in self._sentinels.items() if fd in events]
                if dead and self.exit_code is None:
                    self.on_child_died(dead[0])
                self.maybe_heartbeat()
                self.check_stop()
            return self.exit_code
        finally:
            self._wakeup.close()

    def _timeout_ms(self) -> int:
        timeout_s = self.conn.seconds_until_heartbeat()
        if self.stop is not None:
            timeout_s = min(timeout_s, self.stop.seconds_until_next_action())
        return int(timeout_s * 1000) + 1

    def dispatch(self, msg: protocol.Message) -> None:
        handler = self._dispatch.get(type(msg))
        if handler is None:
            logger.error("unexpected %s from the coordinator; dropped", type(msg).__name__)
            return
        handler(msg)

    def maybe_heartbeat(self) -> None:
        if self.conn.seconds_until_heartbeat() > 0:
            return
        # In-flight counts are fresh here; the scheduler's figures may be up to 100 ms old.
        num_running = min(self.load.num_running, len(self.inflight))
        load = self.load._replace(num_running=num_running, num_waiting=len(self.inflight) - num_running)
        self.conn.send_heartbeat(load, self.state, self.metrics)

    # ------------------------------------------------------------------ coordinator -> rank

    def on_requests(self, msg: protocol.Requests) -> None:
        if self.stop is not None:
            entries = [protocol.EngineOutputEntry(e.request_id, True, 0) for e in msg.entries]
            body = protocol.error_body(f"rank {self.rank} is stopping; request not accepted")
            self.conn.send_outputs(entries, [body] * len(entries))
            return
        raws = []
        for entry, body in zip(msg.entries, msg.bodies, strict=True):
            if not self.inflight.add(entry.request_id):
                logger.warning("request %d is already in flight; duplicate dropped", entry.request_id)
                continue
            raws.append(m.RawRequest(entry.request_id, entry.stream, _to_bytes(body)))
        if raws:
            self.send_to_tokenizer.send_pyobj(m.TokenizeRequests(tuple(raws)))

    def on_abort(self, msg: protocol.EngineAbort) -> None:
        ids = tuple(rid for rid in msg.request_ids if rid in self.inflight)
        if ids:
            self.send_to_tokenizer.send_pyobj(m.AbortRequests(ids, "aborted by the client"))

    def on_error(self, msg: protocol.Error) -> None:
        if msg.code == "rank_taken":
            self.on_displaced(msg.message)
            return
        logger.warning("coordinator error %s: %s", msg.code, msg.message)

    def on_displaced(self, why: str) -> None:
        """A newer process registered under this rank id: this one must go, not linger unseen.

        Its requests were re-dispatched or failed by the coordinator already; the local copies
        end here. The exit code tells the torchrun worker not to restart it (a restart would
        displace the newer rank in turn).
        """
        if self.exit_code is not None:
            return
        logger.error("rank %d: %s; exiting (the newer registration serves this rank id)", self.rank, why)
        if len(self.inflight):
            self.send_to_tokenizer.send_pyobj(m.AbortRequests(self.inflight.ids(), "rank taken over"))
            self.inflight.clear()
        self.exit_code = EXIT_DISPLACED

    def on_reregistered(self, ack: protocol.RegisterAck) -> None:
        # The coordinator already re-dispatched, migrated or failed what we held (or it is a new
        # coordinator, to which our request ids mean nothing): drop it here, silently (the
        # in-flight book forgets the ids, so their abort finals go nowhere).
        if len(self.inflight):
            self.send_to_tokenizer.send_pyobj(m.AbortRequests(self.inflight.ids(), "re-registered"))
            self.inflight.clear()
        self.cache.registered(ack.cache_reports)
        self.apply_state(ack.state)

    def apply_state(self, target: EngineState) -> None:
        """Bring the scheduler to the coordinator's state (a late joiner may start paused)."""
        if self.stop is not None:
            return  # already on the way out
        if target is EngineState.STOPPED:
            self.begin_stop(m.INTERNAL_CONTROL_ID, Signal.STOP, {"drain": False})
            return
        self.send_to_scheduler.send_pyobj(m.ReachState(target))

    def ack(self, control_id: int, sig: Signal, ok: bool, error: str = "") -> None:
        """Acknowledge a control the rank main answers itself (refused, or a finished STOP)."""
        ack = protocol.RankAck(self.rank, ok, self.state, error)
        self.conn.send_control_ack(protocol.ControlAck(control_id, sig, ack))

    def on_control(self, msg: protocol.EngineControl) -> None:
        sig = msg.signal
        if sig in (Signal.STOP, Signal.SHUTDOWN):
            self.begin_stop(msg.control_id, sig, msg.args)
            return
        if self.stop is not None:
            self.ack(msg.control_id, sig, False, f"rank {self.rank} is stopping")
            return
        self.send_to_scheduler.send_pyobj(msg)  # the scheduler checks the transition and acks

    # ------------------------------------------------------------------ children -> rank

    def on_outputs(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                msg = self.recv_outputs.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not isinstance(msg, m.RankOutputs):
                logger.error("unexpected %s on the outputs socket; dropped", type(msg).__name__)
                continue
            entries, bodies = self.inflight.filter_outputs(msg.entries, msg.bodies)
            self.conn.send_outputs(entries, bodies)
            for ack in msg.control_acks:
                self.on_control_ack(ack)
            if msg.load is not None:
                self.load = msg.load
            if msg.metrics is not None:
                self.metrics = msg.metrics
            if msg.cache_events is not None:
                self.cache.add(msg.cache_events)
        self.cache.flush()

    def on_control_ack(self, msg: protocol.ControlAck) -> None:
        """The scheduler's acknowledgement, passed upstream whole."""
        self.state = msg.ack.state
        if not msg.ack.ok:
            logger.warning("control %s failed: %s", msg.signal.value, msg.ack.error)
        if msg.control_id != m.INTERNAL_CONTROL_ID:
            self.conn.send_control_ack(msg)

    def on_child_died(self, child: Child) -> None:
        child.process.join(timeout=1.0)
        error = (
            f"rank {self.rank}: the {child.name} process (pid {child.pid}) died unexpectedly "
            f"(exit code {child.process.exitcode}); the rank is shutting down"
        )
        logger.error(error)
        if self.stop is not None:
            for control_id, sig in self.stop.control_ids:
                self.ack(control_id, sig, False, error)
        # Hand the requests back first: the coordinator re-dispatches or migrates them (what
        # this rank sends after it are dropped there); then nothing of them is left here.
        self.conn.deregister(error, handoff=True)
        self.inflight.clear()
        self.exit_code = 1

    # ------------------------------------------------------------------ stop

    def begin_stop(self, control_id: int, sig: Signal, args: dict[str, Any]) -> None:
        drain = args.get("drain", sig is Signal.STOP)
        deadline_s = args.get("deadline_s", DEFAULT_STOP_DEADLINE_S)
        valid_deadline = isinstance(deadline_s, int | float) and not isinstance(deadline_s, bool)
        if not isinstance(drain, bool) or not valid_deadline or deadline_s < 0:
            self.ack(control_id, sig, False, "stop takes args drain (bool) and deadline_s (number >= 0)")
            return
        if self.stop is None:
            self.stop = StopPlan.start(drain, float(deadline_s))
            self.state = EngineState.STOPPED
            reason = f"rank {self.rank} stopped"
            args = {"drain": drain, "reason": reason}
            self.send_to_scheduler.send_pyobj(
                protocol.EngineControl(m.INTERNAL_CONTROL_ID, Signal.STOP, args)
            )
            logger.info(
                "stopping (drain=%s, deadline %.1f s, %d in flight)", drain, deadline_s, len(self.inflight)
            )
        elif not drain:
            self.stop.deadline = min(self.stop.deadline, time.monotonic())
        if control_id != m.INTERNAL_CONTROL_ID:
            self.stop.control_ids.append((control_id, sig))

    def check_stop(self) -> None:
        stop = self.stop
        if stop is None or self.exit_code is not None:
            return
        if not len(self.inflight):
            self.finish_stop()
        elif stop.should_abort():
            logger.info("stop deadline: aborting %d request(s)", len(self.inflight))
            self.send_to_tokenizer.send_pyobj(
                m.AbortRequests(self.inflight.ids(), f"rank {self.rank} stopped")
            )
            stop.abort_sent_at = time.monotonic()
        elif stop.abort_grace_over():
            logger.warning("%d request(s) got no abort reply in time; failing them here", len(self.inflight))
            entries, bodies = self.inflight.fail_all(f"rank {self.rank} stopped", FinishReason.ABORT)
            self.conn.send_outputs(entries, bodies)
            self.finish_stop()

    def finish_stop(self) -> None:
        assert self.stop is not None
        for control_id, sig in self.stop.control_ids:
            self.ack(control_id, sig, True)
        self.conn.deregister("stopped")
        self.exit_code = 0

    # ------------------------------------------------------------------ signals

    def on_signal(self, signum: int | None) -> None:
        """First SIGTERM/SIGINT: stop without draining. Second: fail what is left and exit."""
        if signum is None:
            return
        if self.stop is None:
            logger.warning("signal %d: stopping; in-flight requests continue on other ranks", signum)
            self.conn.deregister(f"rank {self.rank} terminated by signal {signum}", handoff=True)
            self.begin_stop(m.INTERNAL_CONTROL_ID, Signal.STOP, {"drain": False})
        else:
            logger.warning("signal %d again: failing in-flight requests and exiting now", signum)
            entries, bodies = self.inflight.fail_all(f"rank {self.rank} terminated", FinishReason.ABORT)
            self.conn.send_outputs(entries, bodies)
            self.finish_stop()


def _to_bytes(frame: Frame) -> bytes:
    if isinstance(frame, bytes):
        return frame
    return bytes(frame.buffer if isinstance(frame, zmq.Frame) else frame)
