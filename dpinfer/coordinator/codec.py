"""Header decoding for the coordinator's loop: a validated fast path for the hot kinds.

``Submit`` and ``EngineOutputs`` are checked here field by field without building message
objects (the coordinator only needs their entries); every other kind goes through the
generic ``protocol.decode``. Any invalid input raises ``ProtocolError``, nothing else.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dpinfer import protocol
from dpinfer.errors import ProtocolError

_unpackb = msgpack.unpackb
_packb = msgpack.Packer(use_bin_type=True).pack

KIND_SUBMIT = int(protocol.Kind.SUBMIT)
KIND_ENGINE_OUTPUTS = int(protocol.Kind.ENGINE_OUTPUTS)
KIND_OUTPUTS = int(protocol.Kind.OUTPUTS)
KIND_REQUESTS = int(protocol.Kind.REQUESTS)
KIND_ENGINE_ABORT = int(protocol.Kind.ENGINE_ABORT)


def unpack_header(raw: bytes | memoryview) -> tuple[Any, ...]:
    """The header array ``(kind, *fields)``; ``ProtocolError`` unless it is one."""
    if len(raw) > protocol.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {protocol.MAX_HEADER_BYTES}")
    try:
        arr = _unpackb(raw, use_list=False, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage
        raise ProtocolError(f"undecodable header: {type(e).__name__}") from None
    if type(arr) is not tuple or not arr or type(arr[0]) is not int:
        raise ProtocolError("header must be an array starting with an integer kind")
    return arr


def submit_entries(arr: tuple[Any, ...], num_bodies: int) -> tuple[tuple[int, int, bool], ...]:
    """The checked entries of a ``Submit`` header (one per body frame)."""
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
    return entries


def engine_output_entries(arr: tuple[Any, ...], num_bodies: int) -> tuple[tuple[int, bool, int], ...]:
    """The checked entries of an ``EngineOutputs`` header (one per body frame)."""
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
    return entries


def decode_cold(header: Any, bodies: list[Any]) -> protocol.Message:
    """A full message object for the kinds that are not on the hot path."""
    return protocol.decode([header, *bodies])


def pack_batch(kind: int, entries: list[Any]) -> bytes:
    """The header of a batch message (``Requests``, ``Outputs``, ...) from plain entry tuples."""
    return _packb((kind, entries))
