"""The one codec: every frame on a dpinfer socket is packed and unpacked here.

A header is a msgpack array ``[kind, field1, field2, ...]``; the fields are the message
dataclass's, in declaration order (``bodies`` excepted: they are the frames after the header).
Headers are encoded and decoded with ``msgspec``: each kind has a typed decoder built from the
message's type hints, so one C call both parses and validates a header (types, lengths,
enum values, nested entries), strictly (a bool is not an int, a list of three is not a pair).

- ``encode``/``decode``: messages <-> ZMQ frames; ``encode_submits``: a batch of any size as
  ``Submit`` messages whose headers stay well under ``MAX_HEADER_BYTES``.
- The hot path, for the coordinator's loop and the ranks' output path: ``peek_kind`` (the kind
  of a header, without decoding it), ``submit_entries``/``engine_output_entries`` (the checked
  entries of the two kinds that carry every request and output, without building message
  objects) and ``pack_batch`` (a batch header from plain entry tuples).

Any invalid input raises ``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import msgspec
import zmq

from dpinfer.errors import ProtocolError
from dpinfer.protocol.cache_report import CacheReport
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
    OutputEntry,
    Outputs,
    Register,
    RegisterAck,
    Requests,
    StatusQuery,
    StatusReply,
    Submit,
    SubmitEntry,
)  # fmt: skip

Frame = bytes | memoryview | zmq.Frame
"""What a ZMQ message part may be on receive (``copy=False`` gives ``zmq.Frame``)."""

MESSAGE_TYPES: tuple[type[Message], ...] = (
    ClientHello, Submit, Abort, Control, StatusQuery, ClientBye,
    HelloAck, Outputs, ControlReply, StatusReply, Error, Notice,
    Register, Heartbeat, EngineOutputs, ControlAck, Deregister,
    RegisterAck, Requests, EngineAbort, EngineControl, CacheReport,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Schema:
    cls: type[Message]
    names: tuple[str, ...]
    layout: str
    """The header's fields for error messages, e.g. ``[kind, entries[client_request_id, rank, stream]]``."""
    decoder: msgspec.msgpack.Decoder[tuple[object, ...]]
    entries_per_body: bool
    """A batch message: one body frame per entry of its first field."""


def _schema(cls: type[Message]) -> _Schema:
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "bodies")
    header_type = tuple.__class_getitem__((int, *(hints[n] for n in names)))
    decoder: msgspec.msgpack.Decoder[tuple[object, ...]] = msgspec.msgpack.Decoder(header_type)
    layout = "[kind, " + ", ".join(_describe(n, hints[n]) for n in names) + "]"
    return _Schema(cls, names, layout, decoder, cls.HAS_BODIES and cls is not StatusReply)


def _describe(name: str, tp: object) -> str:
    """A field and, for named tuples or arrays of them, their fields: what a peer must send."""
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    fields = getattr(tp, "_fields", None)
    return f"{name}[{', '.join(fields)}]" if fields else name


_SCHEMAS: dict[int, _Schema] = {int(c.KIND): _schema(c) for c in MESSAGE_TYPES}
assert len(_SCHEMAS) == len(Kind), "every Kind needs exactly one message type"

_encode = msgspec.msgpack.Encoder().encode
_decode_any = msgspec.msgpack.Decoder().decode


def _raw(frame: Frame) -> bytes | memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


# ---------------------------------------------------------------------------- messages


def encode_header(msg: Message) -> bytes:
    schema = _SCHEMAS[msg.KIND]
    return _encode((int(msg.KIND), *(getattr(msg, n) for n in schema.names)))


def encode(msg: Message) -> list[Frame]:
    """Frames for ``msg``: the header, then its bodies (if any), untouched."""
    header = encode_header(msg)
    if msg.HAS_BODIES:
        return [header, *msg.bodies]  # type: ignore[attr-defined]
    return [header]


MAX_SUBMIT_ENTRIES = 1024
"""Entries per ``Submit``: with full prefix keys (256 bytes) a header of about 300 KB."""


def encode_submits(entries: Sequence[SubmitEntry], bodies: Sequence[Frame]) -> list[list[Frame]]:
    """``Submit`` messages for any number of entries, ``MAX_SUBMIT_ENTRIES`` each at most; the
    completions of one group (consecutive entries) are never split, since the hub sends a
    group to one rank only within one ``Submit``."""
    messages: list[list[Frame]] = []
    start, count = 0, len(entries)
    while start < count:
        end = min(start + MAX_SUBMIT_ENTRIES, count)
        while end < count and entries[end].group and entries[end].group == entries[end - 1].group:
            end += 1
        messages.append(encode(Submit(tuple(entries[start:end]), tuple(bodies[start:end]))))
        start = end
    return messages


def decode(frames: Sequence[Frame]) -> Message:
    """Decode ``[header, *bodies]``; any invalid input raises ``ProtocolError``.

    Frames may be ``bytes``, ``memoryview`` or ``zmq.Frame``; body frames are kept as given.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = _raw(frames[0])
    return decode_frames(peek_kind(raw), raw, frames[1:])


def decode_frames(kind: int, header: bytes | memoryview, bodies: Sequence[Frame]) -> Message:
    """The message of a header whose kind ``peek_kind`` found, with its body frames."""
    schema = _SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(f"unknown message kind {kind}")
    values = _decode(schema, header)[1:]
    if not schema.cls.HAS_BODIES:
        if bodies:
            raise ProtocolError(f"{schema.cls.__name__} takes no body frames")
        return schema.cls(*values)
    if schema.entries_per_body:
        _check_count(schema.cls.__name__, len(values[0]), len(bodies))  # type: ignore[arg-type]
    return schema.cls(*values, bodies=tuple(bodies))  # type: ignore[call-arg]


def _decode(schema: _Schema, header: bytes | memoryview) -> tuple[object, ...]:
    try:
        return schema.decoder.decode(header)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"{schema.cls.__name__} {schema.layout}: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable {schema.cls.__name__} header: {e}") from None


def _check_count(name: str, num_entries: int, num_bodies: int) -> None:
    if num_entries != num_bodies:
        raise ProtocolError(f"{name}: {num_entries} entries but {num_bodies} bodies")


# ---------------------------------------------------------------------------- hot path

KIND_SUBMIT = int(Kind.SUBMIT)
KIND_ENGINE_OUTPUTS = int(Kind.ENGINE_OUTPUTS)
KIND_OUTPUTS = int(Kind.OUTPUTS)
KIND_REQUESTS = int(Kind.REQUESTS)
_SUBMIT = _SCHEMAS[KIND_SUBMIT]
_ENGINE_OUTPUTS = _SCHEMAS[KIND_ENGINE_OUTPUTS]
_OUTPUTS = _SCHEMAS[KIND_OUTPUTS]


def peek_kind(raw: bytes | memoryview) -> int:
    """The kind of a header, read without decoding the rest; ``ProtocolError`` if it has none.

    Every dpinfer header is a short array whose first item is a small positive int: two bytes
    (``0x91..0x9f``, then ``0x00..0x7f``). Anything else is parsed in full to find out.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(raw) >= 2 and 0x91 <= raw[0] <= 0x9F and raw[1] < 0x80:
        return raw[1]
    try:
        arr = _decode_any(raw)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable header: {e}") from None
    if type(arr) is not list or not arr or type(arr[0]) is not int:
        raise ProtocolError("header must be an array starting with an integer kind")
    return arr[0]


def submit_entries(header: bytes | memoryview, num_bodies: int) -> tuple[SubmitEntry, ...]:
    """The checked entries of a ``Submit`` header (one per body frame)."""
    entries: tuple[SubmitEntry, ...] = _decode(_SUBMIT, header)[1]  # type: ignore[assignment]
    _check_count("Submit", len(entries), num_bodies)
    return entries


def engine_output_entries(header: bytes | memoryview, num_bodies: int) -> tuple[EngineOutputEntry, ...]:
    """The checked entries of an ``EngineOutputs`` header (one per body frame)."""
    entries: tuple[EngineOutputEntry, ...] = _decode(_ENGINE_OUTPUTS, header)[1]  # type: ignore[assignment]
    _check_count("EngineOutputs", len(entries), num_bodies)
    return entries


def output_entries(header: bytes | memoryview, num_bodies: int) -> tuple[OutputEntry, ...]:
    """The checked entries of an ``Outputs`` header (what a client receives), one per body."""
    entries: tuple[OutputEntry, ...] = _decode(_OUTPUTS, header)[1]  # type: ignore[assignment]
    _check_count("Outputs", len(entries), num_bodies)
    return entries


def pack_batch(kind: int, entries: Sequence[tuple[object, ...]]) -> bytes:
    """The header of a batch message (``Requests``, ``Outputs``, ``EngineOutputs``...)."""
    return _encode((kind, entries))
