"""The one codec: every frame on a dpinfer socket is packed and unpacked here.

- ``encode``/``decode``: messages <-> ZMQ frames (msgpack header + opaque body frames).
  Decoding validates every field against the message's type hints.
- The hot path, for the coordinator's loop and the ranks' output path: ``unpack_header``
  (the raw header array), ``submit_entries``/``engine_output_entries`` (checked entries of
  the two kinds that carry every request and output, without building message objects)
  and ``pack_batch`` (a batch header from plain entry tuples).

Any invalid input raises ``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import zmq

from dpinfer.errors import ProtocolError
from dpinfer.protocol.kinds import MAX_HEADER_BYTES, Kind
from dpinfer.protocol.messages import (
    Abort,
    ClientBye,
    ClientHello,
    Control,
    ControlAck,
    ControlReply,
    Deregister,
    EngineAbort,
    EngineControl,
    EngineOutputEntry,
    EngineOutputs,
    Error,
    Heartbeat,
    HelloAck,
    Message,
    Notice,
    Outputs,
    Register,
    RegisterAck,
    Requests,
    StatusQuery,
    StatusReply,
    Submit,
    SubmitEntry,
)  # fmt: skip

# ---------------------------------------------------------------------------- codec

Frame = bytes | memoryview | zmq.Frame
"""What a ZMQ message part may be on receive (``copy=False`` gives ``zmq.Frame``)."""

_Check = Callable[[Any], Any]


def _checker(tp: Any, where: str) -> _Check:
    """Build a function that validates (and normalises) one decoded value of type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:

        def check_bool(v: object) -> bool:
            if type(v) is not bool:
                raise ProtocolError(f"{where}: expected bool, got {type(v).__name__}")
            return v

        return check_bool
    if tp is int:

        def check_int(v: object) -> int:
            if type(v) is not int:
                raise ProtocolError(f"{where}: expected int, got {type(v).__name__}")
            return v

        return check_int
    if tp is float:

        def check_float(v: object) -> float:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise ProtocolError(f"{where}: expected float, got {type(v).__name__}")

        return check_float
    if tp is str:

        def check_str(v: object) -> str:
            if type(v) is not str:
                raise ProtocolError(f"{where}: expected str, got {type(v).__name__}")
            return v

        return check_str
    if origin is dict:

        def check_dict(v: object) -> dict[str, Any]:
            if type(v) is not dict or not all(type(k) is str for k in v):
                raise ProtocolError(f"{where}: expected a map with string keys")
            return v

        return check_dict
    if origin is tuple:
        item = _checker(typing.get_args(tp)[0], f"{where}[]")

        def check_tuple(v: object) -> tuple[Any, ...]:
            if type(v) is not tuple and type(v) is not list:
                raise ProtocolError(f"{where}: expected an array, got {type(v).__name__}")
            return tuple(item(x) for x in v)

        return check_tuple
    if isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields"):
        hints = typing.get_type_hints(tp)
        subs = tuple(_checker(hints[f], f"{where}.{f}") for f in tp._fields)
        n = len(subs)
        make: Callable[[list[Any]], Any] = cast(Any, tp)._make  # a NamedTuple (checked via _fields)

        def check_named(v: object) -> tuple[object, ...]:
            if (type(v) is not tuple and type(v) is not list) or len(v) != n:
                raise ProtocolError(f"{where}: expected an array of {n} fields")
            return make([c(x) for c, x in zip(subs, v, strict=True)])

        return check_named
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_checker(tp, where)
    if tp is Any:
        return lambda v: v
    if isinstance(tp, types.UnionType):
        raise TypeError(f"{where}: unions are not supported in headers")
    raise TypeError(f"{where}: unsupported header type {tp!r}")


def _enum_checker(tp: type[enum.Enum], where: str) -> _Check:
    by_value = {member.value: member for member in tp}
    valid = ", ".join(str(v) for v in by_value)

    def check_enum(v: object) -> enum.Enum:
        member = by_value.get(v) if type(v) in (str, int) else None
        if member is None:
            raise ProtocolError(f"{where}: {v!r} is not one of: {valid}")
        return member

    return check_enum


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


def encode(msg: Message) -> list[Frame]:
    """Frames for ``msg``: the header, then its bodies (if any), untouched."""
    header = encode_header(msg)
    if msg.HAS_BODIES:
        return [header, *msg.bodies]  # type: ignore[attr-defined]
    return [header]


def decode(frames: Sequence[Frame]) -> Message:
    """Decode ``[header, *bodies]``; any invalid input raises ``ProtocolError``.

    Frames may be ``bytes``, ``memoryview`` or ``zmq.Frame``; body frames are kept as given.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = frames[0]
    return decode_header(unpack_header(header.buffer if isinstance(header, zmq.Frame) else header), frames)


def decode_header(arr: tuple[Any, ...], frames: Sequence[Frame]) -> Message:
    """The message of an already unpacked header array (``unpack_header``) and its frames."""
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


# ---------------------------------------------------------------------------- hot path

KIND_SUBMIT = int(Kind.SUBMIT)
KIND_ENGINE_OUTPUTS = int(Kind.ENGINE_OUTPUTS)
KIND_OUTPUTS = int(Kind.OUTPUTS)
KIND_REQUESTS = int(Kind.REQUESTS)

_unpackb = msgpack.unpackb


def unpack_header(raw: bytes | memoryview) -> tuple[Any, ...]:
    """The header array ``(kind, *fields)``; ``ProtocolError`` unless it is one."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        arr = _unpackb(raw, use_list=False, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage
        raise ProtocolError(f"undecodable header: {type(e).__name__}") from None
    if type(arr) is not tuple or not arr or type(arr[0]) is not int:
        raise ProtocolError("header must be an array starting with an integer kind")
    return arr


def submit_entries(arr: tuple[Any, ...], num_bodies: int) -> tuple[SubmitEntry, ...]:
    """The checked entries of a ``Submit`` header (one per body frame), as plain tuples."""
    if len(arr) != 2 or type(arr[1]) is not tuple:
        raise ProtocolError("Submit: expected [kind, entries]")
    entries = arr[1]
    if len(entries) != num_bodies:
        raise ProtocolError(f"Submit: {len(entries)} entries but {num_bodies} bodies")
    for e in entries:
        if (
            type(e) is not tuple
            or len(e) != 3
            or type(e[0]) is not int
            or type(e[1]) is not int
            or type(e[2]) is not bool
        ):
            raise ProtocolError(
                "Submit: each entry must be [client_request_id: int, rank: int, stream: bool]"
            )
    return cast(tuple[SubmitEntry, ...], entries)  # same fields, in order; not rebuilt on the hot path


def engine_output_entries(arr: tuple[Any, ...], num_bodies: int) -> tuple[EngineOutputEntry, ...]:
    """The checked entries of an ``EngineOutputs`` header (one per body frame), as plain tuples."""
    if len(arr) != 2 or type(arr[1]) is not tuple:
        raise ProtocolError("EngineOutputs: expected [kind, entries]")
    entries = arr[1]
    if len(entries) != num_bodies:
        raise ProtocolError(f"EngineOutputs: {len(entries)} entries but {num_bodies} bodies")
    for e in entries:
        if (
            type(e) is not tuple
            or len(e) != 3
            or type(e[0]) is not int
            or type(e[1]) is not bool
            or type(e[2]) is not int
        ):
            raise ProtocolError(
                "EngineOutputs: each entry must be [request_id: int, final: bool, num_tokens: int]"
            )
    return cast(tuple[EngineOutputEntry, ...], entries)


def pack_batch(kind: int, entries: Sequence[tuple[object, ...]]) -> bytes:
    """The header of a batch message (``Requests``, ``Outputs``, ``EngineOutputs``...)."""
    return _packb((kind, entries))
