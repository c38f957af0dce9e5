"""The client's socket: one DEALER connected to the coordinator, plus a monitor that reports drops.

ZMQ reconnects silently, so a dropped connection is only visible through the socket monitor
(``EVENT_DISCONNECTED``; ZMTP heartbeats turn a silent peer into one). Both clients watch
the monitor and, when it fires, reconnect (``ClientSession.interrupted``) or, with
``reconnect=False``, fail every pending call with ``ConnectionLostError``. The socket keeps
one ``ROUTING_ID`` for its whole life, so the coordinator (``ROUTER_HANDOVER``) sees a TCP
reconnect as the same client.

With ``curve_dir`` the connection is CurveZMQ-encrypted and authenticated; the directory
layout is described in ``dpinfer.protocol.curve`` (``dpinfer keys`` writes it).

Also what the clients build from replies and send again: the errors they raise
(``ControlError``, ``service_error``, ``timeout_message``) and ``resumed_body``, the body
that continues a stream after a reconnect.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from dpinfer.config import ConfigError
from dpinfer.errors import InvalidRequestError, ServiceError
from dpinfer.protocol import ControlAcknowledgement
from dpinfer.protocol.bodies import RequestBody, Resume
from dpinfer.protocol.curve import apply_peer_curve

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
CLOSE_LINGER_MS = 200

MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def connect_dealer(
    ctx: zmq.Context[Any], address: str, curve_dir: str | None = None, routing_id: bytes | None = None
) -> zmq.Socket[Any]:
    """A DEALER connected (asynchronously, as ZMQ does) to ``address``; the socket type follows ``ctx``.

    ``routing_id`` fixes the identity the coordinator knows this client by, across reconnects.
    """
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"--address must look like tcp://HOST:PORT, got {address!r}")
    sock = ctx.socket(zmq.DEALER)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    # The coordinator's ROUTER drops what does not fit our receive queue; never let it fill.
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    if curve_dir is not None:
        try:
            apply_peer_curve(sock, curve_dir)
        except BaseException:
            sock.close(linger=0)
            raise
    try:
        sock.connect(address)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise ConfigError(f"--address {address!r}: {e}") from None
    return sock


def monitor_event(frames: list[bytes]) -> str | None:
    """A human reason if a monitor message means the connection is unusable, else None."""
    event = parse_monitor_message(frames)["event"]
    if event == zmq.EVENT_DISCONNECTED:
        return "connection to the coordinator dropped"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "the coordinator refused this client's CURVE key"
    if event & (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return "ZMTP handshake with the coordinator failed (CURVE keys or security mismatch?)"
    return None


def timeout_message(address: str, timeout_s: float) -> str:
    """The message of an unanswered handshake (the CLI prints it as is)."""
    return (
        f"no coordinator answered at {address} within {timeout_s:g} s; "
        "start one with `dpinfer serve` or `dpinfer coordinator`"
    )


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


def check_acknowledgement(ack: ControlAcknowledgement) -> ControlAcknowledgement:
    """Return ``ack`` if it succeeded; raise ``ControlError`` (a ``ServiceError``) otherwise."""
    if not ack.ok:
        raise ControlError(ack)
    return ack


def service_error(code: str, message: str) -> ServiceError:
    """The exception a client raises for an error reply not tied to a request."""
    return ServiceError(f"{code}: {message}", code=code)


def resumed_body(sent: bytes, token_ids: list[int], text_chars: int) -> bytes:
    """The body that continues request ``sent`` whose stream delivered ``token_ids`` and
    ``text_chars`` characters: ``sent`` with ``resume`` set (extended, if it had one)."""
    if not token_ids and not text_chars:
        return sent
    try:
        body = RequestBody.from_bytes(sent)
    except InvalidRequestError:
        return sent  # the rank will refuse it again, with its own error
    prior = body.resume
    all_ids = (prior.token_ids if prior else ()) + tuple(token_ids)
    all_chars = (prior.text_chars if prior else 0) + text_chars
    return msgspec.structs.replace(body, resume=Resume(all_ids, all_chars)).to_bytes()
