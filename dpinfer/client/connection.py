"""The client's socket: one DEALER connected to the coordinator, plus a monitor that reports drops.

ZMQ reconnects silently, so a dropped connection is only visible through the socket monitor
(``EVENT_DISCONNECTED``; ZMTP heartbeats turn a silent peer into one). Both clients watch
the monitor and fail every pending call with ``ConnectionLostError`` when it fires.

With ``curve_dir`` the connection is CurveZMQ-encrypted and authenticated; the directory
layout is described in ``dpinfer.protocol.curve`` (``dpinfer keys`` writes it).
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dpinfer.config import ConfigError
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


def connect_dealer(ctx: zmq.Context[Any], address: str, curve_dir: str | None = None) -> zmq.Socket[Any]:
    """A DEALER connected (asynchronously, as ZMQ does) to ``address``; the socket type follows ``ctx``."""
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(f"--address must look like tcp://HOST:PORT, got {address!r}")
    sock = ctx.socket(zmq.DEALER)
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
