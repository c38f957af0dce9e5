"""The coordinator's cold-path handlers: handshakes, registration, liveness, control, status.

``PeerHandlers`` is mixed into ``Coordinator`` (server.py), which owns the socket and the
loop; this half decides who may send what:

- client kinds need a ``ClientHello`` first (else ``Error(not_handshaken)``);
- engine kinds need a live registration (else ``Error(not_registered)``, upon which a rank
  registers again; a rank whose id was taken over by a newer process gets ``rank_taken``);
- a client sending engine kinds, a rank sending client kinds, or anyone sending kinds the
  coordinator emits gets ``Error(wrong_direction)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from dpinfer import protocol
from dpinfer.coordinator.registry import ClientPeer, RankPeer
from dpinfer.log import get_logger
from dpinfer.protocol import EngineState, Signal, codec
from dpinfer.protocol.curve import Role, ServerCurve

if TYPE_CHECKING:
    from dpinfer.config import CoordinatorConfig
    from dpinfer.coordinator.forwarding import Forwarder
    from dpinfer.coordinator.lifecycle import Lifecycle
    from dpinfer.coordinator.outbox import Counters, Outbox
    from dpinfer.coordinator.registry import RankRegistry

logger = get_logger(__name__)

ClientHandler = Callable[[ClientPeer, Any, float], None]
RankHandler = Callable[[RankPeer, Any, float], None]
FrameHandler = Callable[[bytes, int, zmq.Frame, list[zmq.Frame], float], None]
"""(identity, kind, header frame, body frames, now): one handler per kind in the dispatch table."""


class PeerHandlers:
    config: CoordinatorConfig
    address: str
    counters: Counters
    outbox: Outbox
    registry: RankRegistry
    lifecycle: Lifecycle
    forwarder: Forwarder
    started_at: float
    incarnation: int
    _curve: ServerCurve | None
    _next_client_sweep: float

    def _init_peers(self) -> None:
        self._clients: dict[bytes, ClientPeer] = {}

    def bump_timer(self, deadline: float) -> None:
        raise NotImplementedError

    def _shutdown_now(self, reason: str, fail_requests: bool = False) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ replies and rejections

    def _error(
        self, identity: bytes, code: str, message: str, client_request_id: int = protocol.NO_REQUEST
    ) -> None:
        self.outbox.send(identity, protocol.Error(code, message, client_request_id))

    def _reject_client_kind(self, identity: bytes) -> None:
        if identity in self.registry.by_identity:
            self._wrong_direction(identity, "an engine rank may not send client messages")
        else:
            self.counters.unknown_peers += 1
            self._error(identity, "not_handshaken", "send ClientHello before anything else")

    def _reject_rank_kind(self, identity: bytes) -> None:
        if identity in self._clients:
            self._wrong_direction(identity, "a client may not send engine-rank messages")
            return
        self.counters.unknown_peers += 1
        taken = self.registry.displaced.get(identity)
        if taken is not None:
            self._error(identity, "rank_taken", f"rank {taken} was taken over by a newer registration")
        else:
            self._error(
                identity, "not_registered", "this rank is not registered (declared dead?); register again"
            )

    def _role(self, header: zmq.Frame) -> Role:
        return Role.ANY if self._curve is None else ServerCurve.role_of(header)

    def _forbidden(self, identity: bytes, message: str) -> None:
        self.counters.forbidden += 1
        self._error(identity, "forbidden", message)

    def _wrong_direction(self, identity: bytes, message: str) -> None:
        self.counters.wrong_direction += 1
        self._error(identity, "wrong_direction", message)

    def _on_wrong_direction(
        self, identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
    ) -> None:
        kind_name = protocol.Kind(kind).name
        self._wrong_direction(identity, f"{kind_name} is sent by the coordinator, not to it")

    def _client_kind(self, fn: ClientHandler) -> FrameHandler:
        def handle(
            identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
        ) -> None:
            client = self._clients.get(identity)
            if client is None:
                self._reject_client_kind(identity)
            else:
                client.last_seen = now
                fn(client, codec.decode_frames(kind, header.buffer, bodies), now)

        return handle

    def _rank_kind(self, fn: RankHandler) -> FrameHandler:
        def handle(
            identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
        ) -> None:
            peer = self.registry.by_identity.get(identity)
            if peer is None:
                self._reject_rank_kind(identity)
            else:
                peer.last_seen = now
                fn(peer, codec.decode_frames(kind, header.buffer, bodies), now)

        return handle

    # ------------------------------------------------------------------ clients

    def _on_hello(
        self, identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
    ) -> None:
        if identity in self.registry.by_identity:
            self._wrong_direction(identity, "an engine rank may not say ClientHello")
            return
        role = self._role(header)
        if role is Role.RANK:
            self._forbidden(identity, "a rank key may not act as a client; use a client or admin key")
            return
        msg = codec.decode_frames(kind, header.buffer, bodies)
        assert isinstance(msg, protocol.ClientHello)
        if msg.version != protocol.PROTOCOL_VERSION:
            self._error(
                identity,
                "version_mismatch",
                f"protocol version {msg.version} is not supported (coordinator speaks "
                f"{protocol.PROTOCOL_VERSION}); upgrade the older side",
            )
            return
        client = self._clients.get(identity)
        known = client is not None
        if client is None:
            client = self._clients[identity] = ClientPeer(identity, msg.client_name, now)
        client.last_seen = now
        client.admin = role in (Role.ADMIN, Role.ANY)
        version, state, num_ranks = protocol.PROTOCOL_VERSION, self.lifecycle.state, len(self.registry.live)
        timeout_s = self.config.client_timeout_s
        routing = self.config.routing.value
        ack = protocol.HelloAck(version, state, num_ranks, self.incarnation, known, timeout_s, routing)
        self.outbox.send(identity, ack)

    def _on_abort(self, client: ClientPeer, msg: protocol.Abort, now: float) -> None:
        self.forwarder.abort(client, msg.client_request_ids)

    def _on_bye(self, client: ClientPeer, msg: protocol.ClientBye, now: float) -> None:
        self.forwarder.client_gone(client)
        del self._clients[client.identity]

    def _forget_client(self, identity: bytes, reason: str) -> bool:
        """Abort a client's requests on their ranks (KV freed) and forget it; False if unknown."""
        client = self._clients.pop(identity, None)
        if client is None:
            return False
        logger.warning(
            "client %r forgotten (%s); %d request(s) aborted", client.name, reason, len(client.requests)
        )
        self.forwarder.client_gone(client)
        return True

    def _client_stalled(self, identity: bytes) -> None:
        """A client whose queue is full stopped reading: disconnect it, never drop its finals.

        When it reads again it finds itself unknown (``not_handshaken``, or ``known`` false
        in its next ``HelloAck``) and resubmits what it still wants.
        """
        if self._forget_client(identity, "it stopped reading; its queue is full"):
            self.counters.slow_clients += 1

    def _forget_silent_clients(self, now: float) -> None:
        timeout_s = self.config.client_timeout_s
        silent = [c.identity for c in self._clients.values() if now - c.last_seen >= timeout_s]
        for identity in silent:
            if self._forget_client(identity, f"silent for {timeout_s:g} s (--client-timeout-s)"):
                self.counters.silent_clients += 1
        self._next_client_sweep = now + timeout_s / 4
        self.registry.prune(now, self.config.dead_rank_ttl_s)

    def _on_status(self, client: ClientPeer, msg: protocol.StatusQuery, now: float) -> None:
        body = msgpack.packb(self.status(now), use_bin_type=True)
        self.outbox.send(client.identity, protocol.StatusReply(msg.query_id, bodies=(body,)))

    def status(self, now: float | None = None) -> dict[str, Any]:
        """The STATUS map: state, ranks (every rank id seen), totals, counters, control.

        Each rank's map holds its load, its ``metrics`` (``RankMetrics.as_map()``: the figures
        its scheduler measured, as of its last heartbeat) and ``routed`` (requests sent to it).
        """
        now = time.monotonic() if now is None else now
        counters = self.counters
        active = self.lifecycle.active
        return {
            "state": self.lifecycle.state.value,
            "address": self.address,
            "routing": self.config.routing.value,
            "deterministic": self.config.deterministic,
            "uptime_s": round(now - self.started_at, 3),
            "cpu_s": time.process_time(),
            "ranks": [self._describe_rank(peer, now) for _, peer in sorted(self.registry.by_rank.items())],
            "totals": {
                "live_ranks": len(self.registry.live),
                "clients": len(self._clients),
                "in_flight": len(self.forwarder.requests),
                "pending": len(self.forwarder.pending),
                "submitted": counters.submitted,
                "completed": counters.completed,
                "failed": counters.failed,
                "aborted": counters.aborted,
            },
            "counters": dataclasses.asdict(counters),
            "control": {
                "active": None if active is None else active.signal.value,
                "queued": len(self.lifecycle.queue),
            },
        }

    def _describe_rank(self, peer: RankPeer, now: float) -> dict[str, Any]:
        routed = self.outbox.routed.get(peer.identity, 0)
        return {**peer.describe(now), "routed": routed, "prefix_keys": self.forwarder.policy.held(peer)}

    # ------------------------------------------------------------------ ranks

    def _on_register_frames(
        self, identity: bytes, kind: int, header: zmq.Frame, bodies: list[zmq.Frame], now: float
    ) -> None:
        if identity in self._clients:
            self._wrong_direction(identity, "a client may not register as an engine rank")
            return
        if self._role(header) not in (Role.RANK, Role.ANY):
            self._forbidden(identity, "only a rank key may register; this is a client or admin key")
            return
        msg = codec.decode_frames(kind, header.buffer, bodies)
        assert isinstance(msg, protocol.Register)
        if msg.version != protocol.PROTOCOL_VERSION:
            self._error(
                identity,
                "version_mismatch",
                f"rank speaks protocol {msg.version}, the coordinator {protocol.PROTOCOL_VERSION}",
            )
            return
        refusal = self.registry.admit(msg)
        if refusal is not None:
            self._error(identity, "bad_register", refusal)
            return
        current = self.registry.by_identity.get(identity)
        if current is not None and current.rank == msg.rank:
            current.last_seen = now  # a duplicate (retried) registration: answer it again
            self._send_register_ack(current)
            return
        if current is not None:
            self._rank_left(current, f"re-registered as rank {msg.rank}", now)
        old = self.registry.by_rank.get(msg.rank)
        if old is not None and old.alive:
            logger.warning(
                "rank %d re-registered from a new process (pid %d, was %d)", msg.rank, msg.pid, old.pid
            )
            self.registry.displace(old, now)
            self._rank_retired(old, f"replaced by a new process (pid {msg.pid})", died=True, now=now)
        if self.lifecycle.state is EngineState.STOPPED and not self.lifecycle.stopping:
            self.lifecycle.state = EngineState.RUNNING  # a rank joining a stopped deployment restarts it
        state = EngineState.RUNNING if self.lifecycle.stopping else self.lifecycle.state
        peer = RankPeer(identity, msg, now, state)
        self.registry.add(peer)
        logger.info(
            "rank %d registered (pid %d on %s, %s, model %r)",
            msg.rank,
            msg.pid,
            msg.host,
            msg.device,
            msg.model,
        )
        self._send_register_ack(peer)
        self.bump_timer(now + self.config.heartbeat_timeout_s)
        self.forwarder.dispatch_pending(now)

    def _send_register_ack(self, peer: RankPeer) -> None:
        state = EngineState.RUNNING if self.lifecycle.stopping else self.lifecycle.state
        self.outbox.send(
            peer.identity,
            protocol.RegisterAck(
                peer.rank,
                state,
                self.config.heartbeat_interval_s,
                self.incarnation,
                self.forwarder.policy.keyed,
            ),
        )

    def _on_heartbeat(self, peer: RankPeer, msg: protocol.Heartbeat, now: float) -> None:
        peer.on_heartbeat(msg, now)

    def _on_deregister(self, peer: RankPeer, msg: protocol.Deregister, now: float) -> None:
        reason = msg.reason or "deregistered"
        if msg.handoff:  # it terminates on its own: its requests go on elsewhere
            logger.info("rank %d leaves and hands its requests back: %s", peer.rank, reason)
            self.registry.remove(peer, now)
            self._rank_retired(peer, reason, died=True, now=now)
            return
        logger.info("rank %d deregistered: %s", peer.rank, reason)
        self._rank_left(peer, reason, now)

    def _rank_left(self, peer: RankPeer, reason: str, now: float) -> None:
        self.registry.remove(peer, now)
        self._rank_retired(peer, reason, died=False, now=now)

    def _rank_dead(self, peer: RankPeer, reason: str, now: float) -> None:
        logger.warning("rank %d (pid %d) declared dead: %s", peer.rank, peer.pid, reason)
        self.counters.rank_deaths += 1
        self.registry.remove(peer, now)
        self._rank_retired(peer, reason, died=True, now=now)

    def _rank_retired(self, peer: RankPeer, reason: str, died: bool, now: float) -> None:
        self.forwarder.rank_gone(peer, reason, died, now)
        if self.forwarder.pending:
            self.bump_timer(now + self.config.no_rank_timeout_s)
        why = f"rank died: {reason}" if died else f"rank left before acknowledging: {reason}"
        if self.lifecycle.on_rank_gone(peer.rank, why):
            self._finish_control(now)

    # ------------------------------------------------------------------ control

    def _on_control(self, client: ClientPeer, msg: protocol.Control, now: float) -> None:
        if not client.admin:
            error = "control signals need an admin key (dpinfer keys --role admin); this is a client key"
            self.outbox.send(client.identity, self.lifecycle.refusal(msg, error))
            return
        if self.lifecycle.preempting(msg):
            preempted, reply = self.lifecycle.preempt(msg)
            logger.info("control %s pre-empts the draining stop", msg.signal)
            self.outbox.send(preempted.client, reply)
            self.lifecycle.queue.appendleft((client.identity, msg))
        else:
            self.lifecycle.queue.append((client.identity, msg))
        self._advance_control(now)

    def _on_control_ack(self, peer: RankPeer, msg: protocol.ControlAck, now: float) -> None:
        if msg.ack.ok:
            peer.state = msg.ack.state
        if self.lifecycle.on_ack(peer.rank, msg):
            self._finish_control(now)

    def _advance_control(self, now: float) -> None:
        lifecycle = self.lifecycle
        while lifecycle.active is None and lifecycle.queue:
            identity, msg = lifecycle.queue.popleft()
            rank_states = {p.rank: p.state for p in self.registry.live}
            result = lifecycle.begin(identity, msg, rank_states, now)
            if isinstance(result, protocol.ControlReply):
                self.outbox.send(identity, result)
                continue
            logger.info("control %s: broadcasting to ranks %s", result.signal.value, list(result.rank_ids))
            if result.wire_signal is Signal.STOP:
                self.forwarder.fail_pending("engines are stopped")
            engine_msg = result.engine_message()
            for rank in result.rank_ids:
                self.outbox.send(self.registry.by_rank[rank].identity, engine_msg)
            self.bump_timer(result.deadline)
            if not result.waiting:
                self._finish_control(now)

    def _finish_control(self, now: float) -> None:
        act = self.lifecycle.active
        assert act is not None
        if act.wire_signal is Signal.STOP and any(p.rank not in act.rank_ids for p in self.registry.live):
            self.lifecycle.state = EngineState.RUNNING  # a rank registered while the others stopped
        act, reply = self.lifecycle.finish()
        ack = reply.ack
        logger.info("control %s done: ok=%s state=%s %s", ack.signal, ack.ok, ack.state.value, ack.error)
        self.outbox.send(act.client, reply)
        if act.signal is Signal.SHUTDOWN:
            self._shutdown_now("shutdown requested", fail_requests=True)
        else:
            self._advance_control(now)
