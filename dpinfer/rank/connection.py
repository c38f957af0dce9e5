"""An engine rank's link to the coordinator: one DEALER socket speaking ``dpinfer.protocol``.

The rank owns the loop: it registers ``EngineConnection.socket`` in its own ``zmq.Poller``,
calls ``recv_ready()`` when the socket is readable, and sends outputs, control acks and
heartbeats through the methods below. Nothing here blocks except ``connect_and_register``,
and nothing received is ever unpickled.

Re-registration is transparent: when the coordinator answers ``Error(code="not_registered")``
(it declared this rank dead, e.g. after a SIGSTOP, or it restarted), the connection sends
``Register`` again and ``recv_ready`` later returns the new ``RegisterAck``. A ``RegisterAck``
from ``recv_ready`` therefore always means "registered again": the coordinator has already
re-dispatched or failed every request this rank held, so the rank should drop them, and it
must apply ``ack.state`` (the deployment may have been paused meanwhile). A ``Register``
whose answer is lost is sent again (the coordinator answers each heartbeat of a rank it does
not know with the same error). ``Error(code="rank_taken")`` means a newer process registered
under this rank id: the rank main exits (``RankMain.on_displaced``), never lingers unseen.
"""

from __future__ import annotations

import os
import secrets
import socket as _socket
import time
from collections.abc import Sequence

import zmq

from dpinfer import protocol
from dpinfer.errors import ProtocolError
from dpinfer.log import get_logger
from dpinfer.protocol.codec import KIND_ENGINE_OUTPUTS, pack_batch
from dpinfer.protocol.messages import NO_METRICS, RankMetrics

logger = get_logger(__name__)

_RETRY_REGISTER_S = 0.5
_MAX_DRAIN = 4096
_HWM = 100_000
_CLOSE_LINGER_MS = 2000
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)


def registration(
    rank: int,
    device: str = "cpu",
    model: str = "",
    max_prompt_len: int = 0,
    kv_capacity_tokens: int = 0,
    max_in_flight: int = 0,
) -> protocol.Register:
    """The ``Register`` message of this process (its pid and host filled in): what a rank tells
    the coordinator about itself, the one value for it."""
    return protocol.Register(
        protocol.PROTOCOL_VERSION, rank, os.getpid(), _socket.gethostname(), device, model,
        max_prompt_len, kv_capacity_tokens, max_in_flight,
    )  # fmt: skip


class EngineConnection:
    """A rank's DEALER link to the coordinator: register, heartbeat, receive, reply."""

    def __init__(
        self,
        address: str,
        info: protocol.Register,
        *,
        curve_dir: str | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.address = address
        self.info = info
        self.heartbeat_interval_s = 0.5
        self.cache_reports = False
        """The coordinator asked for ``CacheReport``s (its last ``RegisterAck``)."""
        self.num_dropped_sends = 0
        self._next_heartbeat = 0.0
        self._reregistering = False
        self._registered_sent_at = 0.0
        self._left = False
        self.incarnation: int | None = None
        """The coordinator process this rank is registered with (``RegisterAck.incarnation``)."""
        self._context = context or zmq.Context.instance()
        self.socket: zmq.Socket = self._context.socket(zmq.DEALER)
        # A fixed routing id keeps this rank's identity across TCP reconnects.
        self.socket.setsockopt(zmq.ROUTING_ID, f"rank{info.rank}-{secrets.token_hex(6)}".encode())
        self.socket.setsockopt(zmq.SNDHWM, _HWM)
        self.socket.setsockopt(zmq.RCVHWM, _HWM)
        self.socket.setsockopt(zmq.LINGER, _CLOSE_LINGER_MS)
        try:
            if curve_dir is not None:
                from dpinfer.protocol.curve import apply_peer_curve

                apply_peer_curve(self.socket, curve_dir)
            self.socket.connect(address)
        except Exception:
            self.socket.close(linger=0)
            raise
        self._register_frames = protocol.encode(info)

    # ------------------------------------------------------------------ registration

    def connect_and_register(self, timeout_s: float) -> protocol.RegisterAck:
        """Register with the coordinator, retrying until ``timeout_s``; return its ``RegisterAck``.

        Raises ``ConnectionError`` when no coordinator answers in time, or when it refuses the
        registration (the message says why, e.g. a protocol version mismatch).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self._send(self._register_frames)
            retry_at = min(deadline, time.monotonic() + _RETRY_REGISTER_S)
            while (wait_s := retry_at - time.monotonic()) > 0:
                if not self.socket.poll(int(wait_s * 1000) + 1, zmq.POLLIN):
                    continue
                # One message at a time: whatever follows the ack stays queued in the socket
                # (so the rank's poller still sees it).
                try:
                    msg = self._recv_one()
                except zmq.Again:
                    continue
                if isinstance(msg, protocol.RegisterAck):
                    self._on_register_ack(msg)
                    return msg
                if isinstance(msg, protocol.Error) and msg.code != "not_registered":
                    raise ConnectionError(
                        f"the coordinator at {self.address} refused rank {self.info.rank}: {msg.message}"
                    )
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"could not reach the coordinator at {self.address} within {timeout_s:g} s: "
                    "is it running?"
                )

    def _on_register_ack(self, ack: protocol.RegisterAck) -> None:
        self.cache_reports = ack.cache_reports
        self.heartbeat_interval_s = ack.heartbeat_interval_s
        self._next_heartbeat = time.monotonic() + ack.heartbeat_interval_s
        if self.incarnation is not None and ack.incarnation != self.incarnation:
            logger.warning("the coordinator restarted (new incarnation); registered with the new one")
        self.incarnation = ack.incarnation
        logger.info("registered as rank %d (state %s)", ack.rank, ack.state)

    # ------------------------------------------------------------------ receiving

    def recv_ready(self) -> list[protocol.Message]:
        """Every message that is ready, without blocking.

        Returns ``Requests``, ``EngineAbort``, ``EngineControl``, ``Error`` and, after a
        transparent re-registration, ``RegisterAck`` (see the module docstring). Undecodable
        frames are logged and skipped.
        """
        out: list[protocol.Message] = []
        for msg in self._drain():
            if isinstance(msg, protocol.Error) and msg.code == "not_registered":
                if self._left:
                    continue  # it deregistered on purpose: what it still sends is not wanted
                # One Register per episode however many errors arrive, again if its answer was lost
                # (the coordinator answers every heartbeat of an unknown rank with this error).
                now = time.monotonic()
                if not self._reregistering or now - self._registered_sent_at >= _RETRY_REGISTER_S:
                    if not self._reregistering:
                        logger.warning("coordinator does not know this rank (%s); registering", msg.message)
                    self._reregistering = True
                    self._registered_sent_at = now
                    self._send(self._register_frames)
                continue
            if isinstance(msg, protocol.RegisterAck):
                if not self._reregistering:
                    continue  # an answer to a duplicate Register: nothing changed
                self._reregistering = False
                self._on_register_ack(msg)
            out.append(msg)
        return out

    def _recv_one(self) -> protocol.Message | None:
        """One decoded message; None if it did not decode (logged). ``zmq.Again`` if none is ready."""
        frames = self.socket.recv_multipart(zmq.NOBLOCK)
        try:
            return protocol.decode(frames)
        except ProtocolError as e:
            logger.warning("dropped an undecodable message from the coordinator: %s", e)
            return None

    def _drain(self) -> list[protocol.Message]:
        msgs: list[protocol.Message] = []
        for _ in range(_MAX_DRAIN):
            try:
                msg = self._recv_one()
            except zmq.Again:
                break
            if msg is not None:
                msgs.append(msg)
        return msgs

    # ------------------------------------------------------------------ sending

    def _send(self, frames: Sequence[bytes | memoryview | zmq.Frame]) -> None:
        send = self.socket.send
        try:
            # Frame by frame (much cheaper than send_multipart); a DEALER refuses a message only
            # at its first frame, so no half message is queued.
            for frame in frames[:-1]:
                send(frame, _MORE)
            send(frames[-1], _NOBLOCK)
        except zmq.Again:
            # The coordinator has been unreachable for a whole high-water mark of messages.
            self.num_dropped_sends += 1
            if self.num_dropped_sends in (1, 10, 100) or self.num_dropped_sends % 1000 == 0:
                logger.warning("coordinator unreachable: dropped %d message(s)", self.num_dropped_sends)

    def send_outputs(self, entries: Sequence[protocol.EngineOutputEntry], bodies: Sequence[bytes]) -> None:
        """One ``EngineOutputs`` message: ``entries[i]`` describes ``bodies[i]`` (``OutputBody`` bytes)."""
        if len(entries) != len(bodies):
            raise ValueError(f"{len(entries)} entries but {len(bodies)} bodies")
        if entries:
            self._send([pack_batch(KIND_ENGINE_OUTPUTS, entries), *bodies])

    def send_cache_report(self, report: protocol.CacheReport) -> None:
        self._send(protocol.encode(report))

    def send_control_ack(self, ack: protocol.ControlAck) -> None:
        self._send(protocol.encode(ack))

    def seconds_until_heartbeat(self) -> float:
        """Seconds until the next heartbeat is due (0 when overdue): use it as the poll timeout."""
        return max(0.0, self._next_heartbeat - time.monotonic())

    def send_heartbeat(
        self, load: protocol.LoadStats, state: protocol.EngineState, metrics: RankMetrics = NO_METRICS
    ) -> None:
        """The rank is alive: its load, state and (cumulative) request metrics, if it has any."""
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval_s
        self._send(protocol.encode(protocol.Heartbeat(load, state, metrics)))

    def deregister(self, reason: str, handoff: bool = False) -> None:
        """Tell the coordinator this rank leaves on purpose; it never registers again.

        With ``handoff`` its requests continue on other ranks (re-dispatched or migrated);
        without (after a STOP) they are not re-dispatched.
        """
        if not self._left:
            self._left = True
            self._send(protocol.encode(protocol.Deregister(reason, handoff)))

    def close(self) -> None:
        """Close the socket; queued messages (e.g. a ``Deregister``) get up to 2 s to leave."""
        if not self.socket.closed:
            self.socket.close(linger=_CLOSE_LINGER_MS)
