"""Message kinds, control signals, lifecycle states and the transitions between them."""

from __future__ import annotations

import enum

from dpinfer.errors import ProtocolError

PROTOCOL_VERSION = 3
"""2: one load value, one acknowledgement value, typed signals and states, rank metrics in heartbeats."""
MAX_HEADER_BYTES = 1 << 20
NO_RANK = -1
NO_REQUEST = -1


class Kind(enum.IntEnum):
    """Every message kind on every dpinfer socket."""

    # client -> coordinator
    CLIENT_HELLO = 1
    SUBMIT = 2
    ABORT = 3
    CONTROL = 4
    STATUS = 5
    CLIENT_BYE = 6
    # coordinator -> client
    HELLO_ACK = 20
    OUTPUTS = 21
    CONTROL_REPLY = 22
    STATUS_REPLY = 23
    ERROR = 24
    NOTICE = 25
    # engine rank -> coordinator
    REGISTER = 40
    HEARTBEAT = 41
    ENGINE_OUTPUTS = 42
    CONTROL_ACK = 43
    DEREGISTER = 44
    CACHE_REPORT = 45
    # coordinator -> engine rank
    REGISTER_ACK = 60
    REQUESTS = 61
    ENGINE_ABORT = 62
    ENGINE_CONTROL = 63


class Signal(enum.StrEnum):
    """Control signals. See ``TRANSITIONS`` for where each is valid."""

    PAUSE = "pause"
    UNPAUSE = "unpause"
    SUSPEND = "suspend"
    RESUME = "resume"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    UPDATE_WEIGHTS = "update_weights"


class EngineState(enum.StrEnum):
    """Lifecycle state of the deployment (the coordinator's) and of each rank."""

    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPED = "stopped"


S = EngineState
TRANSITIONS: dict[Signal, tuple[frozenset[EngineState], EngineState]] = {
    # signal: (states it is valid in, state it leads to)
    Signal.PAUSE: (frozenset({S.RUNNING}), S.PAUSED),
    Signal.UNPAUSE: (frozenset({S.PAUSED}), S.RUNNING),
    Signal.SUSPEND: (frozenset({S.PAUSED}), S.SUSPENDED),
    Signal.RESUME: (frozenset({S.SUSPENDED}), S.PAUSED),
    # Weights are swapped while paused: in-flight requests keep their place, the KV
    # cache and prefix cache are dropped (they belong to the old weights).
    Signal.UPDATE_WEIGHTS: (frozenset({S.PAUSED}), S.PAUSED),
    Signal.STOP: (frozenset({S.RUNNING, S.PAUSED, S.SUSPENDED}), S.STOPPED),
    Signal.SHUTDOWN: (frozenset(EngineState), S.STOPPED),
}


def next_state(current: EngineState, signal: Signal) -> EngineState:
    """The state ``signal`` leads to from ``current``; ``ProtocolError`` if invalid there."""
    valid_in, target = TRANSITIONS[signal]
    if current not in valid_in:
        allowed = ", ".join(sorted(s.value for s in valid_in))
        raise ProtocolError(f"cannot {signal.value} while {current.value} (valid while: {allowed})")
    return target


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
