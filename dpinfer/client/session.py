"""The client side of the protocol without any I/O, shared by the sync and async clients.

``ClientSession`` owns request and control ids, remembers which requests are in flight (and
when they were submitted), builds outgoing frames and turns incoming frames into results,
stream deltas, control acknowledgements and status maps, which it hands to the hooks a
client overrides. It never blocks and never touches a socket, so both clients share one
interpretation of the wire.

Conventions: a request-level failure reported by the service (an ``Error`` naming a request,
or a final output with ``finish_reason="error"``) becomes a ``GenerationResult`` with
``finish_reason="error"`` and ``error`` set; it is not raised. Connection-level failures
(``Notice(shutdown)``, a dropped connection) go to ``on_lost`` and the clients fail every
pending call with ``ConnectionLostError``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpinfer import protocol as p
from dpinfer.errors import ProtocolError, ServiceError
from dpinfer.log import get_logger
from dpinfer.outputs import GenerationResult, Routing, StreamDelta
from dpinfer.protocol import ControlAcknowledgement
from dpinfer.protocol.codec import Frame

logger = get_logger(__name__)


class ControlError(ServiceError):
    """A control signal was refused (invalid transition) or failed on a rank.

    ``acknowledgement`` holds the full reply, per-rank acks included.
    """

    def __init__(self, acknowledgement: ControlAcknowledgement) -> None:
        message = acknowledgement.error or (
            f"{acknowledgement.signal} failed (state {acknowledgement.state}): "
            + "; ".join(f"rank {a.rank}: {a.error or a.state}" for a in acknowledgement.acks if not a.ok)
        )
        super().__init__(message, code="control")
        self.acknowledgement = acknowledgement


@dataclass(slots=True)
class _Inflight:
    submitted_at: float
    stream: bool


def check_acknowledgement(ack: ControlAcknowledgement) -> ControlAcknowledgement:
    """Return ``ack`` if it succeeded; raise ``ControlError`` (a ``ServiceError``) otherwise."""
    if not ack.ok:
        raise ControlError(ack)
    return ack


class ClientSession:
    """Protocol state of one client connection. Subclasses override the ``on_*`` hooks."""

    def __init__(self, address: str, client_name: str) -> None:
        self.address = address
        self.client_name = client_name
        self.hello: p.HelloAck | None = None
        self.lost_reason: str | None = None
        self._request_ids = itertools.count(1)
        self._control_ids = itertools.count(1)
        self._inflight: dict[int, _Inflight] = {}
        self.num_dropped = 0
        """Incoming messages ignored (malformed, or for requests no longer tracked)."""

    # ------------------------------------------------------------------ outgoing

    def hello_frames(self) -> list[Frame]:
        return p.encode(p.ClientHello(p.PROTOCOL_VERSION, self.client_name))

    def add(self, stream: bool, rank: int | None) -> p.SubmitEntry:
        """Register one new request as in flight and return its submit entry."""
        request_id = next(self._request_ids)
        self._inflight[request_id] = _Inflight(time.perf_counter(), stream)
        return p.SubmitEntry(request_id, p.NO_RANK if rank is None else rank, stream)

    def submit_frames(self, entries: Sequence[p.SubmitEntry], bodies: Sequence[bytes]) -> list[Frame]:
        # A body from ``inputs.request_body`` carries its prefix keys for the hub's routing.
        keyed = tuple(
            e._replace(prefix_keys=getattr(b, "prefix_keys", b""))
            for e, b in zip(entries, bodies, strict=True)
        )
        return p.encode(p.Submit(keyed, tuple(bodies)))

    def abort_frames(self, request_ids: Sequence[int]) -> list[Frame]:
        return p.encode(p.Abort(tuple(request_ids)))

    def control_frames(self, signal: p.Signal, args: dict[str, Any]) -> tuple[int, list[Frame]]:
        control_id = next(self._control_ids)
        return control_id, p.encode(p.Control(control_id, signal.value, args))

    def status_frames(self) -> tuple[int, list[Frame]]:
        query_id = next(self._control_ids)
        return query_id, p.encode(p.StatusQuery(query_id))

    def bye_frames(self) -> list[Frame]:
        return p.encode(p.ClientBye())

    def forget(self, request_ids: Sequence[int]) -> None:
        """Stop tracking requests (their late outputs will be dropped)."""
        for request_id in request_ids:
            self._inflight.pop(request_id, None)

    def is_inflight(self, request_id: int) -> bool:
        return request_id in self._inflight

    @property
    def inflight_ids(self) -> list[int]:
        return list(self._inflight)

    # ------------------------------------------------------------------ incoming

    def dispatch(self, frames: Sequence[Frame]) -> None:
        """Decode one incoming message and call the matching hook; bad input is logged and dropped."""
        try:
            msg = p.decode(frames)
        except ProtocolError as e:
            self.num_dropped += 1
            logger.warning("dropping an undecodable message from %s: %s", self.address, e)
            return
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            self.num_dropped += 1
            logger.warning("dropping an unexpected %s from %s", type(msg).__name__, self.address)
            return
        handler(self, msg)

    def _handle_outputs(self, msg: p.Outputs) -> None:
        now = time.perf_counter()
        for entry, frame in zip(msg.entries, msg.bodies, strict=True):
            request_id = entry.client_request_id
            record = self._inflight.get(request_id)
            if record is None:
                self.num_dropped += 1
                continue
            try:
                body = p.OutputBody.from_bytes(frame)
            except ProtocolError as e:
                error = f"bad output body: {e}"
                body = p.OutputBody(finish_reason="error", error=error, error_code=p.ErrorCode.INTERNAL.value)
                entry = p.OutputEntry(request_id, True, entry.rank)
            if not entry.final:
                if record.stream:
                    self.on_delta(StreamDelta(request_id, body.delta_text, body.delta_token_ids))
                continue
            del self._inflight[request_id]
            result = _result(request_id, entry.rank, body, now - record.submitted_at, self._routing(entry))
            self.on_result(result, _tail(result, body) if record.stream else None)

    def _routing(self, entry: p.OutputEntry) -> Routing | None:
        if entry.rank == p.NO_RANK:
            return None
        if entry.routing is not None:
            info = entry.routing
            return Routing(info.policy, entry.rank, info.matched_chars, info.reason)
        policy = self.hello.routing if self.hello is not None else ""
        return Routing(policy, entry.rank, 0, policy)

    def _handle_error(self, msg: p.Error) -> None:
        if msg.code == "duplicate_request":
            # The id of a request still in flight was used again: that submission was refused,
            # the original request goes on and keeps its own result.
            self.on_error(msg.code, msg.message)
            return
        record = self._inflight.pop(msg.client_request_id, None)
        if record is None:
            if msg.code == "not_handshaken" and self.hello is not None:
                # A restarted coordinator on the same address: ZMQ reconnected us silently.
                self.connection_lost(
                    f"the coordinator at {self.address} no longer knows this client (restarted?)"
                )
            else:
                self.on_error(msg.code, msg.message)
            return
        result = GenerationResult(
            request_id=msg.client_request_id,
            text="",
            token_ids=(),
            finish_reason=p.FinishReason.ERROR.value,
            error=f"{msg.code}: {msg.message}",
            error_code=msg.code,
            latency_s=time.perf_counter() - record.submitted_at,
        )
        self.on_result(result, _tail(result, None) if record.stream else None)

    def _handle_hello_ack(self, msg: p.HelloAck) -> None:
        if msg.version != p.PROTOCOL_VERSION:
            self.on_error(
                "version", f"coordinator speaks protocol {msg.version}, client {p.PROTOCOL_VERSION}"
            )
            return
        self.hello = msg
        self.on_hello(msg)

    def _handle_control_reply(self, msg: p.ControlReply) -> None:
        self.on_control(msg.control_id, msg.ack)

    def _handle_status_reply(self, msg: p.StatusReply) -> None:
        try:
            status = p.unpack_body(msg.bodies[0], "status") if msg.bodies else {}
        except ProtocolError as e:
            status = {"error": str(e)}
        self.on_status(msg.query_id, status)

    def _handle_notice(self, msg: p.Notice) -> None:
        if msg.code == "shutdown":
            self.connection_lost(f"coordinator at {self.address} shut down: {msg.message}")
        else:
            logger.info("notice from %s: %s %s", self.address, msg.code, msg.message)

    _HANDLERS: dict[type, Any] = {
        p.Outputs: _handle_outputs,
        p.Error: _handle_error,
        p.HelloAck: _handle_hello_ack,
        p.ControlReply: _handle_control_reply,
        p.StatusReply: _handle_status_reply,
        p.Notice: _handle_notice,
    }

    def connection_lost(self, reason: str) -> None:
        """Mark the connection gone (first reason wins), forget in-flight requests, call ``on_lost``."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._inflight.clear()
        self.on_lost(reason)

    # ------------------------------------------------------------------ hooks

    def on_hello(self, msg: p.HelloAck) -> None:
        """The handshake completed."""

    def on_delta(self, delta: StreamDelta) -> None:
        """A streamed partial output (not the last one) arrived."""

    def on_result(self, result: GenerationResult, tail: StreamDelta | None) -> None:
        """A request finished. ``tail`` is the last delta of a streamed request, else None."""

    def on_control(self, control_id: int, ack: ControlAcknowledgement) -> None:
        """A control signal was answered."""

    def on_status(self, query_id: int, status: dict[str, Any]) -> None:
        """A status query was answered."""

    def on_error(self, code: str, message: str) -> None:
        """An error reply not tied to any tracked request."""
        logger.warning("error from %s: %s: %s", self.address, code, message)

    def on_lost(self, reason: str) -> None:
        """The connection is gone; every tracked request has been forgotten."""


def _result(
    request_id: int, rank: int, body: p.OutputBody, latency_s: float, routing: Routing | None = None
) -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        text=body.text,
        token_ids=body.token_ids,
        finish_reason=body.finish_reason or p.FinishReason.ERROR.value,
        error=body.error if body.finish_reason else (body.error or "final output without a finish reason"),
        error_code=body.error_code if body.finish_reason else (body.error_code or p.ErrorCode.INTERNAL.value),
        rank=rank,
        prompt_tokens=body.prompt_tokens,
        completion_tokens=body.completion_tokens,
        cached_tokens=body.cached_tokens,
        latency_s=latency_s,
        routing=routing,
    )


def _tail(result: GenerationResult, body: p.OutputBody | None) -> StreamDelta:
    text = body.delta_text if body else ""
    token_ids = body.delta_token_ids if body else ()
    return StreamDelta(result.request_id, text, token_ids, finished=True, result=result)


def service_error(code: str, message: str) -> ServiceError:
    """The exception a client raises for an error reply not tied to a request."""
    return ServiceError(f"{code}: {message}", code=code)
