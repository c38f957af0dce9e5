"""The client side of the protocol without any I/O, shared by the sync and async clients.

``ClientSession`` owns request and control ids, remembers which requests are in flight (and
when they were submitted), builds outgoing frames and turns incoming frames into results,
stream deltas, control acknowledgements and status maps, which it hands to the hooks a client
overrides. It never blocks or touches a socket: both clients share one reading of the wire.

Conventions: a request-level failure reported by the service (an ``Error`` naming a request,
or a final output with ``finish_reason="error"``) becomes a ``GenerationResult`` with
``finish_reason="error"`` and ``error`` set; it is not raised.

Lease and reconnect: ``ClientHello`` is repeated as the keepalive (``tick``). A dropped
connection, ``Notice(shutdown)``, ``not_handshaken``, or a ``HelloAck`` that does not know this
client or names another coordinator incarnation is an interruption: requests stay in flight,
control calls already sent fail (never sent twice), hellos go out until a coordinator answers,
then each request still in flight is resubmitted once under its id (identity + request id is
the coordinator's idempotency key; ``duplicate_request`` means it still runs the original, and
is ignored), a stream with ``resume`` = what it already delivered. No answer within
``reconnect_window_s``, or ``reconnect=False``: ``connection_lost`` (``ReconnectTimeoutError``).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpinfer import protocol as p
from dpinfer.client.connection import ControlError as ControlError
from dpinfer.client.connection import check_acknowledgement as check_acknowledgement
from dpinfer.client.connection import resumed_body
from dpinfer.client.connection import service_error as service_error
from dpinfer.client.results import delta_of as _delta
from dpinfer.client.results import result_of as _result
from dpinfer.client.results import routing_of
from dpinfer.client.results import tail_of as _tail
from dpinfer.errors import ConnectionLostError, InvalidRequestError, ProtocolError, ReconnectTimeoutError
from dpinfer.log import get_logger
from dpinfer.outputs import GenerationResult, Routing, StreamDelta
from dpinfer.protocol import ControlAcknowledgement
from dpinfer.protocol.codec import Frame

logger = get_logger(__name__)

KEEPALIVE_MAX_S = 5.0  # keepalive every client_timeout_s / 3 of the HelloAck, at most this apart
OUTAGE_HELLO_S = 0.5  # hello this often while reconnecting


@dataclass(slots=True)
class _Inflight:
    """What resubmitting needs; ``token_ids``/``text_chars``: what a stream delivered so far."""

    submitted_at: float
    stream: bool
    body: bytes
    rank: int
    token_ids: list[int]
    text_chars: int = 0
    aborted: bool = False
    index: int = 0  # which of its prompt's n completions (inputs.KeyedBody.completion_index)
    logprobs: list[p.PositionLogprobs] = field(default_factory=list)  # what the deltas carried
    routed: bool = False  # a delta of this stream said where it went (``StreamDelta.routing``)


@dataclass(slots=True)
class _Call:  # a control or status call awaiting its reply
    frames: list[Frame]
    resend: bool  # safe to send again (a status query)
    sent: bool


class ClientSession:
    """Protocol state of one client connection. Subclasses override the ``on_*`` hooks."""

    def __init__(
        self, address: str, client_name: str, reconnect: bool = True, reconnect_window_s: float = 30.0
    ) -> None:
        if reconnect_window_s <= 0:
            raise InvalidRequestError(f"reconnect_window_s must be > 0, got {reconnect_window_s}")
        self.address = address
        self.client_name = client_name
        self.identity = b"client-" + secrets.token_hex(12).encode()
        """The ZMQ routing id, fixed for the client's life (the idempotency key's first half)."""
        self.reconnect = reconnect
        self.reconnect_window_s = reconnect_window_s
        self.hello: p.HelloAck | None = None
        self.lost_reason: str | None = None
        self._lost_type: type[ConnectionLostError] = ConnectionLostError
        self.outage_since: float | None = None
        """``time.monotonic()`` when the connection was interrupted; None while connected."""
        self.outage_reason = ""
        self._next_hello_at = 0.0
        self._request_ids = itertools.count(1)
        self._control_ids = itertools.count(1)
        self._inflight: dict[int, _Inflight] = {}
        self._open_calls: dict[int, _Call] = {}
        self.num_dropped = 0  # incoming messages ignored (malformed, or for untracked requests)
        self.num_reconnects = 0  # interruptions a coordinator answered again after
        self.num_resubmitted = 0  # requests sent again at a reconnect
        self.num_duplicates = 0  # resubmissions refused because the original still runs

    # ------------------------------------------------------------------ outgoing

    def hello_frames(self) -> list[Frame]:
        return p.encode(p.ClientHello(p.PROTOCOL_VERSION, self.client_name))

    def add(self, stream: bool, rank: int | None, body: bytes = b"") -> p.SubmitEntry:
        """Register one new request as in flight and return its submit entry."""
        request_id = next(self._request_ids)
        wire_rank = p.NO_RANK if rank is None else rank
        index = getattr(body, "completion_index", 0)
        self._inflight[request_id] = _Inflight(time.perf_counter(), stream, body, wire_rank, [], index=index)
        return p.SubmitEntry(request_id, wire_rank, stream)

    def submit_messages(self, entries: Sequence[p.SubmitEntry], bodies: Sequence[bytes]) -> list[list[Frame]]:
        keyed = tuple(  # a body from ``inputs`` carries its prefix keys and group (``KeyedBody``)
            e._replace(prefix_keys=getattr(b, "prefix_keys", b""), group=getattr(b, "group", 0))
            for e, b in zip(entries, bodies, strict=True)
        )
        return p.encode_submits(keyed, bodies)

    def abort_frames(self, request_ids: Sequence[int]) -> list[Frame]:
        for request_id in request_ids:
            record = self._inflight.get(request_id)
            if record is not None:
                record.aborted = True  # an outage now ends it as aborted instead of resubmitting it
        return p.encode(p.Abort(tuple(request_ids)))

    def control_frames(self, signal: p.Signal, args: dict[str, Any]) -> tuple[int, list[Frame]]:
        control_id = next(self._control_ids)
        return control_id, p.encode(p.Control(control_id, signal.value, args))

    def status_frames(self) -> tuple[int, list[Frame]]:
        query_id = next(self._control_ids)
        return query_id, p.encode(p.StatusQuery(query_id))

    def bye_frames(self) -> list[Frame]:
        return p.encode(p.ClientBye())

    def call_started(self, call_id: int, frames: list[Frame], resend: bool) -> bool:
        """Track a control/status call; True if it is to be sent now (else at the reconnect)."""
        call = self._open_calls[call_id] = _Call(frames, resend, self.outage_since is None)
        return call.sent

    def call_done(self, call_id: int) -> None:
        self._open_calls.pop(call_id, None)

    def forget(self, request_ids: Sequence[int]) -> None:
        """Stop tracking requests (their late outputs will be dropped)."""
        for request_id in request_ids:
            self._inflight.pop(request_id, None)

    def is_inflight(self, request_id: int) -> bool:
        return request_id in self._inflight

    @property
    def inflight_ids(self) -> list[int]:
        return list(self._inflight)

    @property
    def connected(self) -> bool:
        """Handshaken, and neither lost nor reconnecting."""
        return self.hello is not None and self.lost_reason is None and self.outage_since is None

    def lost_error(self) -> ConnectionLostError:
        return self._lost_type(self.lost_reason or "not connected")

    # ------------------------------------------------------------------ lease and reconnect

    def tick(self, now: float) -> bool:
        """True when a hello is due now; ends an outage past its window. Next: ``seconds_to_tick``."""
        if self.hello is None or self.lost_reason is not None:
            return False
        if self.outage_since is not None and now - self.outage_since >= self.reconnect_window_s:
            self.connection_lost(
                f"no coordinator answered at {self.address} within the {self.reconnect_window_s:g} s "
                f"reconnect window ({self.outage_reason})",
                ReconnectTimeoutError,
            )
            return False
        if now < self._next_hello_at:
            return False
        self._next_hello_at = now + self._hello_interval_s()
        return True

    def seconds_to_tick(self, now: float) -> float:
        due = self._next_hello_at
        if self.outage_since is not None:
            due = min(due, self.outage_since + self.reconnect_window_s)
        return max(0.0, due - now)

    def _hello_interval_s(self) -> float:
        if self.outage_since is not None or self.hello is None:
            return OUTAGE_HELLO_S
        return max(0.01, min(KEEPALIVE_MAX_S, self.hello.client_timeout_s / 3))

    def interrupted(self, reason: str) -> None:
        """Reconnect, keeping what is in flight (before the handshake, or without reconnect: lose it)."""
        if self.lost_reason is not None or self.outage_since is not None:
            return
        if not self.reconnect or self.hello is None:
            self.connection_lost(reason)
            return
        logger.warning("%s; reconnecting (for up to %g s)", reason, self.reconnect_window_s)
        self.outage_since = time.monotonic()
        self.outage_reason = reason
        self._next_hello_at = self.outage_since + OUTAGE_HELLO_S
        failed = [cid for cid, call in self._open_calls.items() if call.sent and not call.resend]
        for call_id in failed:
            del self._open_calls[call_id]
        for call in self._open_calls.values():
            call.sent = False
        self.on_interrupted(reason, failed)

    def _reconnected(self) -> None:
        """A coordinator answered after an interruption: resubmit what is in flight, once."""
        self.outage_since = None
        self.num_reconnects += 1
        self._next_hello_at = time.monotonic() + self._hello_interval_s()
        entries, bodies, aborted = [], [], []
        for request_id, record in self._inflight.items():
            if record.aborted:
                aborted.append(request_id)
            else:
                entries.append(p.SubmitEntry(request_id, record.rank, record.stream))
                bodies.append(resumed_body(record.body, record.token_ids, record.text_chars))
        for request_id in aborted:  # the abort may never have arrived: end them here
            self._fail(request_id, p.FinishReason.ABORT.value, "aborted", p.ErrorCode.ABORTED.value)
        messages = self.submit_messages(entries, bodies)
        self.num_resubmitted += len(entries)
        for call in self._open_calls.values():
            if not call.sent:
                call.sent = True
                messages.append(call.frames)
        logger.warning("reconnected to %s; %d request(s) resubmitted", self.address, len(entries))
        self.on_reconnected(messages)

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
                    record.token_ids.extend(body.delta_token_ids)
                    record.text_chars += len(body.delta_text)
                    record.logprobs.extend(body.logprobs or ())
                    # The hub's explanation (a stream's first output), else the hello's policy, once.
                    says = entry.routing is not None or (not record.routed and self.hello is not None)
                    record.routed |= says
                    routing = self._routing(entry) if says else None
                    self.on_delta(_delta(request_id, body, routing, record.index))
                continue
            del self._inflight[request_id]
            latency_s, routing = now - record.submitted_at, self._routing(entry)
            result = _result(request_id, entry.rank, body, latency_s, routing, record.index, record.logprobs)
            self.on_result(result, _tail(result, body) if record.stream else None)

    def _routing(self, entry: p.OutputEntry) -> Routing | None:
        return routing_of(entry, self.hello.routing if self.hello is not None else "")

    def _handle_error(self, msg: p.Error) -> None:
        if msg.code == "duplicate_request":
            # A resubmitted request the coordinator still runs: the original goes on and its
            # outputs keep coming. (Nothing else reuses an id: this client numbers them.)
            self.num_duplicates += 1
            logger.debug("request %d still runs at %s", msg.client_request_id, self.address)
            return
        if msg.client_request_id not in self._inflight:
            if msg.code == "not_handshaken" and self.hello is not None:
                # A restarted coordinator on the same address (ZMQ reconnected us silently), or
                # one that forgot this client.
                self.interrupted(f"the coordinator at {self.address} no longer knows this client")
            else:
                self.on_error(msg.code, msg.message)
            return
        self._fail(msg.client_request_id, p.FinishReason.ERROR.value, f"{msg.code}: {msg.message}", msg.code)

    def _fail(self, request_id: int, finish_reason: str, error: str, error_code: str) -> None:
        record = self._inflight.pop(request_id)
        latency_s = time.perf_counter() - record.submitted_at
        result = GenerationResult(
            request_id, "", (), finish_reason, error, error_code, latency_s=latency_s, index=record.index
        )
        self.on_result(result, _tail(result, None) if record.stream else None)

    def _handle_hello_ack(self, msg: p.HelloAck) -> None:
        if msg.version != p.PROTOCOL_VERSION:
            self.on_error(
                "version", f"coordinator speaks protocol {msg.version}, client {p.PROTOCOL_VERSION}"
            )
            return
        previous, self.hello = self.hello, msg
        if previous is None:
            self._next_hello_at = time.monotonic() + self._hello_interval_s()
            self.on_hello(msg)
            return
        if self.lost_reason is not None:
            return
        if not msg.known or msg.incarnation != previous.incarnation:  # its requests are gone there
            self.interrupted(f"the coordinator at {self.address} restarted or forgot this client")
        if self.outage_since is not None:
            self._reconnected()

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
            self.interrupted(f"coordinator at {self.address} shut down: {msg.message}")
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

    def connection_lost(
        self, reason: str, error_type: type[ConnectionLostError] = ConnectionLostError
    ) -> None:
        """Gone for good (first reason wins): forget what is in flight, call ``on_lost``."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._lost_type = error_type
        self.outage_since = None
        self._inflight.clear()
        self._open_calls.clear()
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

    def on_interrupted(self, reason: str, failed_calls: list[int]) -> None:
        """Reconnecting: send a hello now; fail ``failed_calls`` (control calls maybe applied)."""

    def on_reconnected(self, messages: list[list[Frame]]) -> None:
        """A coordinator answered again: send ``messages`` (the resubmission, then held calls)."""

    def on_lost(self, reason: str) -> None:
        """The connection is gone; every tracked request has been forgotten."""
