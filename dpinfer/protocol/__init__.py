"""The wire protocol: every message kind, every message type, one codec.

- ``kinds.py``    ``Kind``, ``Signal``, ``EngineState``, ``TRANSITIONS``: every kind and state
- ``messages.py`` one frozen dataclass per kind; typed entries and values (``LoadStats``,
                  ``RankAck``, ``ControlAcknowledgement``) carried whole from hop to hop
- ``bodies.py``   ``RequestBody`` and ``OutputBody``: the frames the coordinator never decodes
- ``codec.py``    the one codec, hot path included
- ``local.py``    the messages between the processes of one rank, grouped by receiver
- ``curve.py``    CurveZMQ keys and socket setup, shared by the hub, the ranks and the clients

The bottom layer with ``config``: may import only ``config``, ``sampling``, ``log`` and
``errors`` of dpinfer (and msgpack, msgspec, zmq); never torch.

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

from dpinfer.errors import ProtocolError
from dpinfer.protocol.bodies import (
    REQUEST_BODY_FIELDS,
    ErrorCode,
    OutputBody,
    PositionLogprobs,
    RequestBody,
    error_body,
    pack_body,
    unpack_body,
)
from dpinfer.protocol.cache_report import CacheReport
from dpinfer.protocol.codec import MESSAGE_TYPES, decode, encode, encode_header, encode_submits
from dpinfer.protocol.kinds import (
    MAX_HEADER_BYTES,
    NO_RANK,
    NO_REQUEST,
    PROTOCOL_VERSION,
    TRANSITIONS,
    EngineState,
    FinishReason,
    Kind,
    Signal,
    next_state,
)
from dpinfer.protocol.messages import (
    Abort,
    ClientBye,
    ClientHello,
    Control,
    ControlAck,
    ControlAcknowledgement,
    ControlReply,
    Deregister,
    EngineAbort,
    EngineControl,
    EngineOutputEntry,
    EngineOutputs,
    Error,
    Heartbeat,
    HelloAck,
    Histogram,
    LoadStats,
    Message,
    Notice,
    OutputEntry,
    Outputs,
    RankAck,
    RankMetrics,
    Register,
    RegisterAck,
    RequestEntry,
    Requests,
    StatusQuery,
    StatusReply,
    Submit,
    SubmitEntry,
)
from dpinfer.protocol.route_info import RouteInfo

__all__ = [
    "MAX_HEADER_BYTES",
    "MESSAGE_TYPES",
    "NO_RANK",
    "NO_REQUEST",
    "PROTOCOL_VERSION",
    "REQUEST_BODY_FIELDS",
    "TRANSITIONS",
    "Abort",
    "CacheReport",
    "ClientBye",
    "ClientHello",
    "Control",
    "ControlAck",
    "ControlAcknowledgement",
    "ControlReply",
    "Deregister",
    "EngineAbort",
    "EngineControl",
    "EngineOutputEntry",
    "EngineOutputs",
    "EngineState",
    "Error",
    "ErrorCode",
    "FinishReason",
    "Heartbeat",
    "HelloAck",
    "Histogram",
    "Kind",
    "LoadStats",
    "Message",
    "Notice",
    "OutputBody",
    "OutputEntry",
    "Outputs",
    "PositionLogprobs",
    "ProtocolError",
    "RankAck",
    "RankMetrics",
    "Register",
    "RegisterAck",
    "RequestBody",
    "RequestEntry",
    "Requests",
    "RouteInfo",
    "Signal",
    "StatusQuery",
    "StatusReply",
    "Submit",
    "SubmitEntry",
    "decode",
    "encode",
    "encode_header",
    "encode_submits",
    "error_body",
    "next_state",
    "pack_body",
    "unpack_body",
]  # fmt: skip
