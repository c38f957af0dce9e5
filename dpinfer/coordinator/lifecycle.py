"""The deployment's lifecycle state machine and control-signal acknowledgement.

Control signals are serialised: they queue, and one at a time is validated against
``protocol.TRANSITIONS`` *when its turn comes* (so a queued UNPAUSE behind a PAUSE is valid).
A valid signal moves the deployment to its target state at once (ranks that register while
it is in flight get that state), is broadcast as ``EngineControl`` to every live rank, and
completes when every one of those ranks has acknowledged, died, left, or timed out; the
caller then gets one ``ControlReply`` listing each rank's ``RankAck``. An invalid signal gets
a ``ControlReply`` with ``ok=False`` naming the current state.

This module does no I/O: the coordinator sends what it returns.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dpinfer import protocol
from dpinfer.errors import ProtocolError
from dpinfer.protocol import EngineState, RankAck, Signal

DEFAULT_STOP_DEADLINE_S = 30.0


@dataclass
class ActiveControl:
    """The control signal being applied now."""

    client: bytes
    client_control_id: int
    signal: Signal
    wire_signal: Signal
    """What the ranks get: SHUTDOWN is sent to them as STOP (they stop; the coordinator exits)."""
    args: dict[str, Any]
    control_id: int
    """The coordinator's id for this broadcast (client ids may collide)."""
    target: EngineState
    deadline: float
    rank_ids: tuple[int, ...]
    prior_state: EngineState = EngineState.RUNNING
    """The deployment's state before this signal (a pre-empted STOP goes back to it)."""
    rank_states: dict[int, EngineState] = field(default_factory=dict)
    """Each rank's state when the signal was sent: what a rank that never answers is reported in."""
    waiting: set[int] = field(default_factory=set)
    acks: dict[int, RankAck] = field(default_factory=dict)

    def engine_message(self) -> protocol.EngineControl:
        return protocol.EngineControl(self.control_id, self.wire_signal, self.args)


def _stop_args(args: dict[str, Any], default_drain: bool) -> dict[str, Any]:
    drain = args.get("drain", default_drain)
    deadline_s = args.get("deadline_s", DEFAULT_STOP_DEADLINE_S)
    if type(drain) is not bool:
        raise ProtocolError(f"stop: 'drain' must be a bool, got {type(drain).__name__}")
    if type(deadline_s) not in (int, float) or not 0 <= deadline_s < math.inf:
        raise ProtocolError(f"stop: 'deadline_s' must be a number >= 0, got {deadline_s!r}")
    return {"drain": drain, "deadline_s": float(deadline_s)}


def parse_signal(name: str) -> Signal:
    try:
        return Signal(name)
    except ValueError:
        valid = ", ".join(s.value for s in Signal)
        raise ProtocolError(f"unknown control signal {name!r} (valid: {valid})") from None


def parse_args(signal: Signal, args: dict[str, Any]) -> dict[str, Any]:
    """The normalised args of ``signal``; ``ProtocolError`` saying what is wrong."""
    if signal is Signal.STOP:
        return _stop_args(args, default_drain=True)
    if signal is Signal.SHUTDOWN:
        return _stop_args({"deadline_s": 0.0, **args}, default_drain=False)
    if signal is Signal.UPDATE_WEIGHTS:
        path = args.get("path")
        if type(path) is not str or not path:
            raise ProtocolError("update_weights needs args {'path': <non-empty string>}")
        return {"path": path}
    return {}


class Lifecycle:
    """State, the queue of control signals, and the one being acknowledged."""

    def __init__(self, control_timeout_s: float) -> None:
        self.state = EngineState.RUNNING
        self.control_timeout_s = control_timeout_s
        self.queue: deque[tuple[bytes, protocol.Control]] = deque()
        self.active: ActiveControl | None = None
        self._next_control_id = 1

    @property
    def stopping(self) -> bool:
        return self.active is not None and self.active.wire_signal is Signal.STOP

    def begin(
        self, client: bytes, msg: protocol.Control, rank_states: dict[int, EngineState], now: float
    ) -> ActiveControl | protocol.ControlReply:
        """Start ``msg``: the new ``ActiveControl``, or the error reply when it is invalid now."""
        assert self.active is None, "control signals are applied one at a time"
        try:
            signal = parse_signal(msg.signal)
            target = protocol.next_state(self.state, signal)
            args = parse_args(signal, msg.args)
        except ProtocolError as e:
            return self.refusal(msg, str(e))
        wire_signal = Signal.STOP if signal is Signal.SHUTDOWN else signal
        timeout_s = self.control_timeout_s
        if wire_signal is Signal.STOP:
            # Draining ranks may take their whole deadline before they acknowledge.
            timeout_s += args["deadline_s"]
        act = ActiveControl(
            client=client,
            client_control_id=msg.control_id,
            signal=signal,
            wire_signal=wire_signal,
            args=args,
            control_id=self._next_control_id,
            target=target,
            deadline=now + timeout_s,
            rank_ids=tuple(rank_states),
            prior_state=self.state,
            rank_states=dict(rank_states),
            waiting=set(rank_states),
        )
        self._next_control_id += 1
        self.state = target
        self.active = act
        return act

    def preempting(self, msg: protocol.Control) -> bool:
        """Whether ``msg`` goes before a draining STOP that waits for its deadline: a STOP that
        aborts (``dpinfer stop --abort``) or a SHUTDOWN. Every other signal waits its turn."""
        act = self.active
        if act is None or act.wire_signal is not Signal.STOP or not act.args.get("drain"):
            return False
        try:
            signal = parse_signal(msg.signal)
            args = parse_args(signal, msg.args)
        except ProtocolError:
            return False
        return signal is Signal.SHUTDOWN or (signal is Signal.STOP and not args["drain"])

    def preempt(self, by: protocol.Control) -> tuple[ActiveControl, protocol.ControlReply]:
        """End the draining STOP now, for ``by`` to begin: the reply its caller gets says why.

        The ranks are not told to undo anything: ``by`` reaches them as a STOP that aborts,
        which ends the drain they are in.
        """
        act = self.active
        assert act is not None and self.preempting(by)
        self.active = None
        self.state = act.prior_state
        acks = tuple(act.acks[r] for r in sorted(act.acks))
        how = "SHUTDOWN" if by.signal == Signal.SHUTDOWN else "a STOP that aborts"
        error = f"pre-empted by {how}: requests still running are aborted, not drained"
        ack = protocol.ControlAcknowledgement(act.signal.value, EngineState.STOPPED, False, acks, error)
        return act, protocol.ControlReply(act.client_control_id, ack)

    def on_ack(self, rank: int, msg: protocol.ControlAck) -> bool:
        """Record a rank's ack; True when the active control is now complete."""
        act = self.active
        if act is None or msg.control_id != act.control_id or rank not in act.waiting:
            return False
        act.waiting.discard(rank)
        # The registration authenticated the rank id; a rank cannot answer for another.
        act.acks[rank] = msg.ack if msg.ack.rank == rank else msg.ack._replace(rank=rank)
        return not act.waiting

    def on_rank_gone(self, rank: int, why: str) -> bool:
        """A rank died or left before acking; True when the active control is now complete."""
        act = self.active
        if act is None or rank not in act.waiting:
            return False
        act.waiting.discard(rank)
        act.acks[rank] = RankAck(rank, False, act.rank_states[rank], why)
        return not act.waiting

    def expire(self, now: float) -> bool:
        """Fail the acks still missing after the deadline; True when that completed the control."""
        act = self.active
        if act is None or now < act.deadline:
            return False
        for rank in sorted(act.waiting):
            why = f"no acknowledgement within {self.control_timeout_s:g} s"
            act.acks[rank] = RankAck(rank, False, act.rank_states[rank], why)
        act.waiting.clear()
        return True

    def deadline(self) -> float:
        return self.active.deadline if self.active is not None else math.inf

    def finish(self) -> tuple[ActiveControl, protocol.ControlReply]:
        """Close the active control; the reply for its caller."""
        act = self.active
        assert act is not None and not act.waiting
        self.active = None
        acks = tuple(act.acks[r] for r in sorted(act.acks))
        failed = [a for a in acks if not a.ok]
        error = "; ".join(f"rank {a.rank}: {a.error or 'failed'}" for a in failed)
        ack = protocol.ControlAcknowledgement(act.signal.value, self.state, not failed, acks, error)
        return act, protocol.ControlReply(act.client_control_id, ack)

    def refusal(self, msg: protocol.Control, error: str) -> protocol.ControlReply:
        """The reply to ``msg`` when it is not applied at all (state unchanged, no rank asked)."""
        return protocol.ControlReply(
            msg.control_id, protocol.ControlAcknowledgement(msg.signal, self.state, False, (), error)
        )
