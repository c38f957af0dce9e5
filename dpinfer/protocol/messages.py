"""Every header message: a frozen dataclass per ``Kind``, and the typed entries of batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from dpinfer.protocol.kinds import NO_REQUEST, EngineState, Kind, Signal

# ---------------------------------------------------------------------------- entries


class SubmitEntry(NamedTuple):
    client_request_id: int
    rank: int  # NO_RANK: the routing policy picks; otherwise pin to this rank id
    stream: bool


class RequestEntry(NamedTuple):
    request_id: int
    stream: bool


class EngineOutputEntry(NamedTuple):
    request_id: int
    final: bool
    num_tokens: int  # tokens generated so far; > 0 means the client has seen output


class OutputEntry(NamedTuple):
    client_request_id: int
    final: bool
    rank: int


class RankAck(NamedTuple):
    """One rank's answer to a control signal: made by its scheduler (or by the rank main when
    the rank is stopping, or by the coordinator for a rank that died or never answered) and
    carried whole to the caller inside ``ControlAcknowledgement``."""

    rank: int
    ok: bool
    state: EngineState
    """The rank's state afterwards (when it did not answer: its state when the signal was sent)."""
    error: str = ""


class ControlAcknowledgement(NamedTuple):
    """The service's answer to a control signal, in aggregate and per rank.

    Public as ``dpinfer.ControlAcknowledgement``.

    ``signal`` is the name the caller sent; ``state`` the deployment's state afterwards (or its
    unchanged state if refused); ``ok`` is true when the transition was valid and every live
    rank acknowledged it; ``acks`` holds one ``RankAck`` per rank; ``error`` says why it was
    refused or failed (it names the current state for invalid transitions).
    """

    signal: str
    state: EngineState
    ok: bool
    acks: tuple[RankAck, ...] = ()
    error: str = ""


class LoadStats(NamedTuple):
    """A rank's load: measured by its scheduler, sent in heartbeats, shown by ``dpinfer status``.

    Routing never uses these figures (they may be up to a heartbeat old); it uses the
    coordinator's own exact in-flight counts.
    """

    num_waiting: int = 0
    num_running: int = 0
    kv_used_tokens: int = 0
    """Slots held by requests (cached prefixes in use included)."""
    kv_free_tokens: int = 0
    """Slots free now or reclaimable by evicting unused cached prefixes."""
    kv_capacity_tokens: int = 0


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every header message. ``bodies`` holds the opaque frames after the header."""

    KIND: ClassVar[Kind]
    HAS_BODIES: ClassVar[bool] = False


# client -> coordinator


@dataclass(frozen=True, slots=True)
class ClientHello(Message):
    KIND = Kind.CLIENT_HELLO
    version: int
    client_name: str


@dataclass(frozen=True, slots=True)
class Submit(Message):
    KIND = Kind.SUBMIT
    HAS_BODIES = True
    entries: tuple[SubmitEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Abort(Message):
    KIND = Kind.ABORT
    client_request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Control(Message):
    KIND = Kind.CONTROL
    control_id: int
    signal: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    KIND = Kind.STATUS
    query_id: int


@dataclass(frozen=True, slots=True)
class ClientBye(Message):
    KIND = Kind.CLIENT_BYE


# coordinator -> client


@dataclass(frozen=True, slots=True)
class HelloAck(Message):
    KIND = Kind.HELLO_ACK
    version: int
    state: EngineState
    num_ranks: int


@dataclass(frozen=True, slots=True)
class Outputs(Message):
    KIND = Kind.OUTPUTS
    HAS_BODIES = True
    entries: tuple[OutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    """``control_id`` is the caller's; ``ack`` is what the caller gets, as is."""

    KIND = Kind.CONTROL_REPLY
    control_id: int
    ack: ControlAcknowledgement


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """``bodies[0]`` is a msgpack map: state, ranks (list of maps), totals, counters."""

    KIND = Kind.STATUS_REPLY
    HAS_BODIES = True
    query_id: int
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A protocol-level error (not handshaken, malformed frame, unknown request...)."""

    KIND = Kind.ERROR
    code: str
    message: str
    client_request_id: int = NO_REQUEST


@dataclass(frozen=True, slots=True)
class Notice(Message):
    """Unsolicited news for a client, e.g. ``code="shutdown"`` before the coordinator exits."""

    KIND = Kind.NOTICE
    code: str
    message: str


# engine rank -> coordinator


@dataclass(frozen=True, slots=True)
class Register(Message):
    KIND = Kind.REGISTER
    version: int
    rank: int
    pid: int
    host: str
    device: str
    model: str
    max_prompt_len: int
    kv_capacity_tokens: int


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    KIND = Kind.HEARTBEAT
    load: LoadStats
    state: EngineState


@dataclass(frozen=True, slots=True)
class EngineOutputs(Message):
    KIND = Kind.ENGINE_OUTPUTS
    HAS_BODIES = True
    entries: tuple[EngineOutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlAck(Message):
    """A rank's acknowledgement of ``EngineControl(control_id, signal)``; the scheduler makes it."""

    KIND = Kind.CONTROL_ACK
    control_id: int
    signal: Signal
    ack: RankAck


@dataclass(frozen=True, slots=True)
class Deregister(Message):
    """A rank leaving on purpose (after STOP): not a death, nothing to re-dispatch."""

    KIND = Kind.DEREGISTER
    reason: str


# coordinator -> engine rank


@dataclass(frozen=True, slots=True)
class RegisterAck(Message):
    KIND = Kind.REGISTER_ACK
    rank: int
    state: EngineState
    heartbeat_interval_s: float


@dataclass(frozen=True, slots=True)
class Requests(Message):
    KIND = Kind.REQUESTS
    HAS_BODIES = True
    entries: tuple[RequestEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineAbort(Message):
    KIND = Kind.ENGINE_ABORT
    request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EngineControl(Message):
    """A control signal for one rank; the rank main hands this very value to its scheduler."""

    KIND = Kind.ENGINE_CONTROL
    control_id: int
    signal: Signal
    args: dict[str, Any]
