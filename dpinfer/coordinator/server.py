"""The coordinator: one ROUTER socket, one event loop, the single address clients know.

Sockets: a ROUTER bound on ``config.bind_address`` that engine ranks and clients both reach
with DEALER sockets (ROUTER_MANDATORY, NOBLOCK sends, MAXMSGSIZE = ``max_frame_bytes``,
optional CURVE), and an inproc PULL that ``close()`` uses to wake the loop.

The loop polls with a timeout equal to the next timer (heartbeat deadline, control ack
deadline, no-rank deadline), drains what is ready (bounded per turn), dispatches each
message through one table keyed by ``protocol.Kind``, then flushes one batch per
destination. Any invalid input is counted and answered with an ``Error`` where a reply is
possible; nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from dpinfer import protocol
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.forwarding import Forwarder
from dpinfer.coordinator.lifecycle import Lifecycle
from dpinfer.coordinator.outbox import Counters, Outbox
from dpinfer.coordinator.peers import PeerHandlers
from dpinfer.coordinator.registry import RankPeer, RankRegistry
from dpinfer.errors import ProtocolError
from dpinfer.log import get_logger
from dpinfer.protocol import codec
from dpinfer.protocol.curve import ServerCurve

logger = get_logger(__name__)

MAX_MESSAGES_PER_TURN = 512
_NOBLOCK = int(zmq.NOBLOCK)
_MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HWM = 100_000
_CLOSE_LINGER_MS = 1000

Handler = Callable[[bytes, int, zmq.Frame, list[zmq.Frame], float], None]


class Coordinator(PeerHandlers):
    """The hub between clients and engine ranks. ``run()`` blocks until SHUTDOWN or ``close()``."""

    def __init__(self, config: CoordinatorConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self._cleaned = False
        self._close_lock = threading.RLock()
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self.counters = Counters()
        self._curve: ServerCurve | None = None
        self._socket = self._context.socket(zmq.ROUTER)
        try:
            self._configure_socket()
        except Exception:
            self._cleanup()
            raise
        self.address: str = cast(bytes, self._socket.last_endpoint).decode()
        self._wake_address = f"inproc://dpinfer-coordinator-wake-{id(self)}"
        self._wake = self._context.socket(zmq.PULL)
        self._wake.bind(self._wake_address)
        # Connection-level events the loop never sees as messages: a peer dropped by ZMQ for an
        # oversize message, or one whose CURVE handshake failed.
        self._monitor = self._socket.get_monitor_socket(_MONITOR_EVENTS)
        self.registry = RankRegistry(config.deterministic)
        self.outbox = Outbox(self._socket, self.counters)
        self.lifecycle = Lifecycle(config.control_timeout_s)
        self.forwarder = Forwarder(config, self.registry, self.outbox, self.counters, self.lifecycle)
        self._init_peers()
        self._running = False
        self._closing = False
        self._loop_thread: int | None = None
        self._next_client_sweep = time.monotonic() + config.client_timeout_s / 4
        self._next_timer = self._next_client_sweep
        self.started_at = time.monotonic()
        self.incarnation = secrets.randbits(63)
        """This coordinator process, for ranks and clients (``HelloAck``, ``RegisterAck``)."""
        self._handlers = self._handler_table()

    def _configure_socket(self) -> None:
        s = self._socket
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnects with its fixed routing id takes its identity back.
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        s.setsockopt(zmq.SNDHWM, _HWM)
        s.setsockopt(zmq.RCVHWM, _HWM)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        s.setsockopt(zmq.LINGER, _CLOSE_LINGER_MS)
        if ":" in self.config.host:
            s.setsockopt(zmq.IPV6, 1)
        if self.config.curve_dir is not None:
            self._curve = ServerCurve(self._context, self.config.curve_dir)
            self._curve.apply(s)
        s.bind(self.config.bind_address)

    def _handler_table(self) -> dict[int, Handler]:
        k = protocol.Kind
        table: dict[int, Handler] = {
            k.SUBMIT: self._on_submit,
            k.ENGINE_OUTPUTS: self._on_engine_outputs,
            k.CLIENT_HELLO: self._on_hello,
            k.ABORT: self._client_kind(self._on_abort),
            k.CONTROL: self._client_kind(self._on_control),
            k.STATUS: self._client_kind(self._on_status),
            k.CLIENT_BYE: self._client_kind(self._on_bye),
            k.REGISTER: self._on_register_frames,
            k.HEARTBEAT: self._rank_kind(self._on_heartbeat),
            k.CONTROL_ACK: self._rank_kind(self._on_control_ack),
            k.DEREGISTER: self._rank_kind(self._on_deregister),
            k.CACHE_REPORT: self._rank_kind(self._on_cache_report),
        }
        for kind in k:
            table.setdefault(kind, self._on_wrong_direction)
        return table

    # ------------------------------------------------------------------ the loop

    def run(self, wakeup_fd: int | None = None) -> None:
        """Serve until a SHUTDOWN signal, ``close()`` or KeyboardInterrupt; then close the sockets.

        ``wakeup_fd`` (e.g. the read end of ``signal.set_wakeup_fd``) is polled too, so a
        signal always interrupts the wait; what is written to it is discarded.
        """
        if self._cleaned:
            return  # closed before it ran
        self._loop_thread = threading.get_ident()
        self._running = not self._closing
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        if wakeup_fd is not None:
            poller.register(wakeup_fd, zmq.POLLIN)
        logger.info("coordinator listening on %s (routing %s)", self.address, self.config.routing.value)
        try:
            while self._running:
                timeout = self._next_timer - time.monotonic()
                events = poller.poll(None if timeout == math.inf else max(0, int(timeout * 1000) + 1))
                if len(events) > 1 or (events and events[0][0] is not self._socket):
                    self._drain_side_channels(events, wakeup_fd)
                if self._closing:
                    self._shutdown_now("the coordinator was closed")
                    break
                now = time.monotonic()
                self._drain(now)
                if now >= self._next_timer:
                    self._on_timers(now)
                self._flush(now)
        except KeyboardInterrupt:
            self._shutdown_now("the coordinator was interrupted")
        finally:
            self._running = False
            self._cleanup()

    def _drain(self, now: float) -> None:
        recv = self._socket.recv
        handlers = self._handlers
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                identity = recv(_NOBLOCK)
            except zmq.Again:
                return
            # A ROUTER message is [identity, at least one frame]. ``Frame.more`` is far cheaper
            # than getsockopt(RCVMORE); bodies are forwarded untouched, never copied.
            header = recv(_NOBLOCK, copy=False)
            bodies = []
            more = header.more
            while more:
                body = recv(_NOBLOCK, copy=False)
                bodies.append(body)
                more = body.more
            try:
                kind = codec.peek_kind(header.buffer)
                handler = handlers.get(kind)
                if handler is None:
                    raise ProtocolError(f"unknown message kind {kind}")
                handler(identity, kind, header, bodies, now)
            except ProtocolError as e:
                self.counters.malformed_frames += 1
                self._error(identity, "malformed", str(e))
            except Exception:  # no input may stop the loop; the bug is logged
                self.counters.malformed_frames += 1
                logger.exception("internal error while handling a message; the loop goes on")
            if not self._running:
                return

    def _drain_side_channels(self, events: list[tuple[Any, int]], wakeup_fd: int | None) -> None:
        if wakeup_fd is not None and any(sock == wakeup_fd for sock, _ in events):
            try:
                os.read(wakeup_fd, 512)
            except BlockingIOError:
                pass
        self._drain_monitor()

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.counters.disconnects += 1
            elif event["event"] != zmq.EVENT_MONITOR_STOPPED:
                self.counters.handshake_failures += 1

    def _flush(self, now: float) -> None:
        outbox = self.outbox
        for _ in range(4):
            outbox.flush()
            if outbox.stalled:
                stalled, outbox.stalled = outbox.stalled, []
                for identity in dict.fromkeys(stalled):
                    self._client_stalled(identity)
            if not outbox.unreachable:
                return
            gone, outbox.unreachable = outbox.unreachable, []
            for identity in gone:
                peer = self.registry.by_identity.get(identity)
                if peer is not None:
                    self._rank_dead(peer, "its connection is gone", now)
                else:
                    self._forget_client(identity, "its connection is gone")

    def _on_timers(self, now: float) -> None:
        timeout_s = self.config.heartbeat_timeout_s
        for peer in self.registry.expired(now, timeout_s):
            self._rank_dead(peer, f"no heartbeat for {timeout_s:g} s", now)
        if now >= self._next_client_sweep:
            self._forget_silent_clients(now)
        self.forwarder.expire_pending(now)
        if self.lifecycle.expire(now):
            self._finish_control(now)
        pending = self.forwarder.pending.next_deadline()
        self._next_timer = min(
            self.registry.next_deadline(timeout_s),
            self.lifecycle.deadline(),
            math.inf if pending is None else pending,
            self._next_client_sweep,
        )

    def bump_timer(self, deadline: float) -> None:
        if deadline < self._next_timer:
            self._next_timer = deadline

    # ------------------------------------------------------------------ hot path

    def _on_submit(
        self, identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
    ) -> None:
        client = self._clients.get(identity)
        if client is None:
            self._reject_client_kind(identity)
            return
        client.last_seen = now
        entries = codec.submit_entries(header.buffer, len(bodies))
        self.forwarder.submit(client, entries, bodies, now)
        if self.forwarder.pending:
            self.bump_timer(now + self.config.no_rank_timeout_s)

    def _on_engine_outputs(
        self, identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
    ) -> None:
        peer = self.registry.by_identity.get(identity)
        if peer is None:
            self._reject_rank_kind(identity)
            return
        peer.last_seen = now
        self.forwarder.engine_outputs(peer, codec.engine_output_entries(header.buffer, len(bodies)), bodies)

    def _on_cache_report(self, peer: RankPeer, msg: protocol.CacheReport, now: float) -> None:
        self.forwarder.policy.on_report(peer, msg)

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop the loop from any thread (clients get a shutdown notice); safe to call twice."""
        self._closing = True
        with self._close_lock:  # never races the loop thread's own cleanup
            if self._cleaned:
                return
            if self._loop_thread is None:
                self._cleanup()
            elif threading.get_ident() != self._loop_thread:
                push = self._context.socket(zmq.PUSH)
                push.connect(self._wake_address)
                push.send(b"", zmq.NOBLOCK)
                push.close(linger=100)

    def _shutdown_now(self, reason: str, fail_requests: bool = False) -> None:
        """Tell every client, flush, and leave the loop.

        After a SHUTDOWN signal (``fail_requests``: the ranks were stopped first) whatever is
        left fails here. When the process is closed or interrupted, the ranks go on and what
        is in flight is not failed: a client that reconnects to the coordinator started in
        its place resubmits it (continuing streams from what they delivered), one that does
        not fails it on the notice, and the ranks drop the old copies when they register again.
        """
        logger.info("shutting down: %s", reason)
        if fail_requests:
            self.forwarder.fail_all(f"{reason}; the request did not finish")
        while self.lifecycle.queue:
            identity, msg = self.lifecycle.queue.popleft()
            self.outbox.send(identity, self.lifecycle.refusal(msg, reason))
        for client in self._clients.values():
            self.outbox.send(client.identity, protocol.Notice("shutdown", reason))
        self.outbox.flush()
        self._running = False

    def _cleanup(self) -> None:
        with self._close_lock:
            if not self._cleaned:
                self._cleaned = True
                self._close_sockets()

    def _close_sockets(self) -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            self._socket.disable_monitor()
            monitor.close()
        for sock in (getattr(self, "_wake", None), self._socket):
            if sock is not None and not sock.closed:
                sock.close()
        if self._curve is not None:
            self._curve.stop()
        if self._own_context:
            self._context.term()
