"""The wire protocol: every message kind, every message type, one codec.

A message on any dpinfer socket is a ZMQ multipart message ``[header, *bodies]``:

- ``header`` is a small msgpack array ``[kind, field1, field2, ...]`` whose fields are the
  fields of the message's frozen dataclass, in declaration order. ``kind`` is a ``Kind``.
- ``bodies`` are opaque frames. Batch messages (``Submit``, ``Requests``, ``EngineOutputs``,
  ``Outputs``) carry one body per entry, in entry order. The coordinator decodes headers
  only and forwards bodies untouched; bodies are msgpack maps (``RequestBody``,
  ``OutputBody``) decoded by the engine rank and by the client.

Nothing here ever pickles. ``decode`` turns any invalid input into ``ProtocolError``.

Request life on the wire (ids: the client picks ``client_request_id``; the coordinator
assigns ``request_id``, unique for its lifetime)::

    client --Submit[entries]+bodies--> coordinator --Requests[entries]+bodies--> rank
    rank --EngineOutputs[entries]+bodies--> coordinator --Outputs[entries]+bodies--> client

An output entry with ``final=False`` is a streamed partial; exactly one ``final=True``
entry ends every request (also aborted, failed and rank-died requests).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import msgpack

from dpinfer.errors import ProtocolError

PROTOCOL_VERSION = 1
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
    rank: int
    ok: bool
    state: str
    error: str


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
    state: str
    num_ranks: int


@dataclass(frozen=True, slots=True)
class Outputs(Message):
    KIND = Kind.OUTPUTS
    HAS_BODIES = True
    entries: tuple[OutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    KIND = Kind.CONTROL_REPLY
    control_id: int
    signal: str
    ok: bool
    state: str
    acks: tuple[RankAck, ...]
    error: str


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
    num_waiting: int
    num_running: int
    kv_used_tokens: int
    kv_free_tokens: int
    state: str


@dataclass(frozen=True, slots=True)
class EngineOutputs(Message):
    KIND = Kind.ENGINE_OUTPUTS
    HAS_BODIES = True
    entries: tuple[EngineOutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlAck(Message):
    KIND = Kind.CONTROL_ACK
    control_id: int
    signal: str
    ok: bool
    state: str
    error: str


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
    state: str
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
    KIND = Kind.ENGINE_CONTROL
    control_id: int
    signal: str
    args: dict[str, Any]


# ---------------------------------------------------------------------------- codec

_Check = Callable[[Any], Any]


def _checker(tp: Any, where: str) -> _Check:
    """Build a function that validates (and normalises) one decoded value of type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:

        def check_bool(v: Any) -> bool:
            if type(v) is not bool:
                raise ProtocolError(f"{where}: expected bool, got {type(v).__name__}")
            return v

        return check_bool
    if tp is int:

        def check_int(v: Any) -> int:
            if type(v) is not int:
                raise ProtocolError(f"{where}: expected int, got {type(v).__name__}")
            return v

        return check_int
    if tp is float:

        def check_float(v: Any) -> float:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise ProtocolError(f"{where}: expected float, got {type(v).__name__}")

        return check_float
    if tp is str:

        def check_str(v: Any) -> str:
            if type(v) is not str:
                raise ProtocolError(f"{where}: expected str, got {type(v).__name__}")
            return v

        return check_str
    if origin is dict:

        def check_dict(v: Any) -> dict[str, Any]:
            if type(v) is not dict or not all(type(k) is str for k in v):
                raise ProtocolError(f"{where}: expected a map with string keys")
            return v

        return check_dict
    if origin is tuple:
        item = _checker(typing.get_args(tp)[0], f"{where}[]")

        def check_tuple(v: Any) -> tuple[Any, ...]:
            if type(v) is not tuple and type(v) is not list:
                raise ProtocolError(f"{where}: expected an array, got {type(v).__name__}")
            return tuple(item(x) for x in v)

        return check_tuple
    if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):
        hints = typing.get_type_hints(tp)
        subs = tuple(_checker(hints[f], f"{where}.{f}") for f in tp._fields)
        n = len(subs)
        make = tp._make

        def check_named(v: Any) -> Any:
            if (type(v) is not tuple and type(v) is not list) or len(v) != n:
                raise ProtocolError(f"{where}: expected an array of {n} fields")
            return make([c(x) for c, x in zip(subs, v, strict=True)])

        return check_named
    if tp is Any:
        return lambda v: v
    if isinstance(tp, types.UnionType):
        raise TypeError(f"{where}: unions are not supported in headers")
    raise TypeError(f"{where}: unsupported header type {tp!r}")


@dataclass(frozen=True)
class _Schema:
    cls: type[Message]
    checks: tuple[_Check, ...]
    min_fields: int
    names: tuple[str, ...]


def _schema(cls: type[Message]) -> _Schema:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name != "bodies"]
    checks = tuple(_checker(hints[f.name], f"{cls.__name__}.{f.name}") for f in fields)
    required = sum(1 for f in fields if f.default is dataclasses.MISSING)
    return _Schema(cls, checks, required, tuple(f.name for f in fields))


MESSAGE_TYPES: tuple[type[Message], ...] = (
    ClientHello, Submit, Abort, Control, StatusQuery, ClientBye,
    HelloAck, Outputs, ControlReply, StatusReply, Error, Notice,
    Register, Heartbeat, EngineOutputs, ControlAck, Deregister,
    RegisterAck, Requests, EngineAbort, EngineControl,
)  # fmt: skip
_SCHEMAS: dict[int, _Schema] = {int(c.KIND): _schema(c) for c in MESSAGE_TYPES}
assert len(_SCHEMAS) == len(Kind), "every Kind needs exactly one message type"

_packb = msgpack.Packer(use_bin_type=True).pack


def encode_header(msg: Message) -> bytes:
    schema = _SCHEMAS[msg.KIND]
    return _packb([int(msg.KIND), *(getattr(msg, n) for n in schema.names)])


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: the header, then its bodies (if any), untouched."""
    header = encode_header(msg)
    if msg.HAS_BODIES:
        return [header, *msg.bodies]  # type: ignore[attr-defined]
    return [header]


def decode(frames: Sequence[Any]) -> Message:
    """Decode ``[header, *bodies]``; any invalid input raises ``ProtocolError``.

    Frames may be ``bytes``, ``memoryview`` or ``zmq.Frame``; body frames are kept as given.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = frames[0]
    raw = header.buffer if hasattr(header, "buffer") else header
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        arr = msgpack.unpackb(raw, use_list=False, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage
        raise ProtocolError(f"undecodable header: {type(e).__name__}") from None
    if type(arr) is not tuple or not arr or type(arr[0]) is not int:
        raise ProtocolError("header must be an array starting with an integer kind")
    schema = _SCHEMAS.get(arr[0])
    if schema is None:
        raise ProtocolError(f"unknown message kind {arr[0]}")
    values = arr[1:]
    if not schema.min_fields <= len(values) <= len(schema.checks):
        raise ProtocolError(f"{schema.cls.__name__}: expected {len(schema.checks)} fields, got {len(values)}")
    args = [check(v) for check, v in zip(schema.checks, values, strict=False)]
    if schema.cls.HAS_BODIES:
        bodies = tuple(frames[1:])
        entries = args[0] if schema.cls is not StatusReply else None
        if entries is not None and len(entries) != len(bodies):
            raise ProtocolError(f"{schema.cls.__name__}: {len(entries)} entries but {len(bodies)} bodies")
        return schema.cls(*args, bodies=bodies)  # type: ignore[call-arg]
    if len(frames) > 1:
        raise ProtocolError(f"{schema.cls.__name__} takes no body frames")
    return schema.cls(*args)


# ---------------------------------------------------------------------------- bodies


def pack_body(data: dict[str, Any]) -> bytes:
    return _packb(data)


def unpack_body(frame: Any, what: str = "body") -> dict[str, Any]:
    raw = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001
        raise ProtocolError(f"undecodable {what}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a map, got {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class OutputBody:
    """What a rank sends back for one request (an ``Outputs``/``EngineOutputs`` body).

    Partial (streamed) outputs carry ``delta_text``/``delta_token_ids`` only. The final
    output carries the whole ``text`` and ``token_ids``, plus for streamed requests the
    last ``delta_text``/``delta_token_ids`` not yet sent, and the counters.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    delta_text: str = ""
    delta_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_bytes(self) -> bytes:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return _packb(out)

    @classmethod
    def from_bytes(cls, frame: Any) -> OutputBody:
        data = unpack_body(frame, "output body")
        try:
            body = cls(**data)
        except TypeError as e:
            raise ProtocolError(f"output body: {e}") from None
        object.__setattr__(body, "token_ids", tuple(body.token_ids))
        object.__setattr__(body, "delta_token_ids", tuple(body.delta_token_ids))
        return body


def error_body(message: str, reason: FinishReason = FinishReason.ERROR) -> bytes:
    """The final output body of a request that ends without generating (error, abort)."""
    return OutputBody(finish_reason=reason.value, error=message).to_bytes()


REQUEST_BODY_FIELDS = frozenset({"prompt", "messages", "images", "sampling", "model_inputs"})
"""Keys of a request body (a msgpack map), validated by the engine rank:

- ``prompt``: str, or a list of token ids; or
- ``messages``: list of ``{"role": str, "content": str}`` (chat template applied by the rank);
- ``images``: optional list; each item is encoded image ``bytes`` or a raw array map
  ``{"shape": [h, w, c], "dtype": "uint8", "data": bytes}``;
- ``sampling``: ``SamplingParams.to_dict()``.
"""
