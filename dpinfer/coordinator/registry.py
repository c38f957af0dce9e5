"""Who is connected (engine ranks with liveness and load, handshaken clients) and what they wait on.

``Req`` is one in-flight request; ``PendingQueue`` holds those waiting for any live rank.

Peers are keyed by their ZMQ routing identity. A rank id may change identity (a restarted
process, or a rank that re-registers after being declared dead); the newest registration
wins and the displaced identity is remembered so its process can be told so.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from dpinfer import protocol
from dpinfer.coordinator.migration import Streamed
from dpinfer.protocol.messages import NO_METRICS

_MAX_DISPLACED = 1024
UNLIMITED_CREDIT = 1 << 62
"""The credit of a rank that registers with ``max_in_flight`` 0 (no limit of its own)."""
MAX_RANKS = 4096
"""Most rank ids the coordinator keeps (live, and dead ones still shown by ``status``)."""
MAX_RANK_ID = 1 << 20
MAX_NAME_CHARS = 256
"""Longest host, device or model name a rank may register with."""


class RankPeer:
    """One registration of an engine rank. ``in_flight`` is the coordinator's own exact count."""

    __slots__ = (
        "alive", "completed", "credit", "device", "gone_at", "host", "identity", "in_flight",
        "kv_capacity_tokens", "last_heartbeat", "last_seen", "load", "max_prompt_len", "metrics", "model",
        "pid", "rank", "state",
    )  # fmt: skip

    def __init__(
        self, identity: bytes, msg: protocol.Register, now: float, state: protocol.EngineState
    ) -> None:
        self.identity = identity
        self.rank = msg.rank
        self.pid = msg.pid
        self.host = msg.host
        self.device = msg.device
        self.model = msg.model
        self.max_prompt_len = msg.max_prompt_len
        self.kv_capacity_tokens = msg.kv_capacity_tokens
        self.credit = msg.max_in_flight if msg.max_in_flight > 0 else UNLIMITED_CREDIT
        """Most requests it takes at once (it says so when it registers); the rest wait here."""
        self.alive = True
        self.gone_at = 0.0
        """When it died or left (``alive`` false): ``status`` lists it until ``dead_rank_ttl_s`` later."""
        self.in_flight = 0
        self.completed = 0
        self.load = protocol.LoadStats(0, 0, 0, msg.kv_capacity_tokens, msg.kv_capacity_tokens)
        """The rank's own figures, for ``status`` only (routing uses ``in_flight``)."""
        self.metrics = NO_METRICS
        """The rank's request figures, cumulative since its process started (``status``, ``/metrics``)."""
        self.state = state
        self.last_seen = now
        self.last_heartbeat = now

    def on_heartbeat(self, msg: protocol.Heartbeat, now: float) -> None:
        # Load figures are informational; ``in_flight`` stays the coordinator's own count.
        self.load = msg.load
        self.state = msg.state
        self.last_heartbeat = now
        if msg.metrics.is_consistent():  # else keep the last good figures (a broken peer)
            self.metrics = msg.metrics

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "rank": self.rank, "pid": self.pid, "host": self.host, "device": self.device,
            "model": self.model, "alive": self.alive, "state": self.state.value,
            "in_flight": self.in_flight, "completed": self.completed,
            "credit": self.credit if self.credit != UNLIMITED_CREDIT else None,
            **self.load._asdict(),
            "kv_capacity_tokens": self.kv_capacity_tokens, "max_prompt_len": self.max_prompt_len,
            "heartbeat_age_s": round(now - self.last_heartbeat, 3),
            "metrics": self.metrics.as_map(),
        }  # fmt: skip


class ClientPeer:
    """A client that completed the ``ClientHello`` handshake; ``requests`` maps its ids to ours."""

    __slots__ = ("admin", "closed", "identity", "last_seen", "name", "requests")

    def __init__(self, identity: bytes, name: str, now: float) -> None:
        self.identity = identity
        self.name = name
        self.last_seen = now
        """When it was last heard from (any message; the SDK's keepalive is a repeated hello)."""
        self.closed = False
        self.admin = True
        """May send control signals (an admin key, or CURVE off)."""
        self.requests: dict[int, Req] = {}


class RankRegistry:
    """Live ranks in routing order, every rank ever seen, and identities that were displaced.

    ``live`` is ordered by registration, or by rank id when ``deterministic`` (so a fresh
    deployment routes the same request sequence to the same ranks).
    """

    def __init__(self, deterministic: bool) -> None:
        self.deterministic = deterministic
        self.live: list[RankPeer] = []
        self.by_identity: dict[bytes, RankPeer] = {}
        self.by_rank: dict[int, RankPeer] = {}
        self.displaced: dict[bytes, int] = {}

    def add(self, peer: RankPeer) -> None:
        """Make ``peer`` the live registration of its rank id (the caller retired any previous one)."""
        previous = self.by_rank.get(peer.rank)
        if previous is not None:
            peer.completed = previous.completed
        self.by_rank[peer.rank] = peer
        self.by_identity[peer.identity] = peer
        self.displaced.pop(peer.identity, None)
        self.live.append(peer)
        if self.deterministic:
            self.live.sort(key=lambda p: p.rank)

    def admit(self, msg: protocol.Register) -> str | None:
        """Why a registration is refused (ids and names out of bounds, too many ranks), or None."""
        if not 0 <= msg.rank < MAX_RANK_ID:
            return f"rank id must be in 0..{MAX_RANK_ID - 1}, got {msg.rank}"
        for what, name in (("host", msg.host), ("device", msg.device), ("model", msg.model)):
            if len(name) > MAX_NAME_CHARS:
                return f"{what} name has {len(name)} characters; at most {MAX_NAME_CHARS}"
        if msg.rank not in self.by_rank and len(self.by_rank) >= MAX_RANKS:
            self.prune(math.inf, 0.0)
            if len(self.by_rank) >= MAX_RANKS:
                return f"the coordinator already serves {MAX_RANKS} ranks"
        return None

    def prune(self, now: float, ttl_s: float) -> None:
        """Forget ranks dead or gone for ``ttl_s`` (all of them when ``now`` is infinite)."""
        for rank, peer in list(self.by_rank.items()):
            if not peer.alive and now - peer.gone_at >= ttl_s:
                del self.by_rank[rank]

    def remove(self, peer: RankPeer, now: float) -> None:
        """Retire ``peer`` (dead, left, or displaced); its rank id stays listed as not alive."""
        peer.alive = False
        peer.gone_at = now
        self.by_identity.pop(peer.identity, None)
        if peer in self.live:
            self.live.remove(peer)

    def displace(self, peer: RankPeer, now: float) -> None:
        """Retire ``peer`` because a newer process registered its rank id."""
        self.remove(peer, now)
        if len(self.displaced) >= _MAX_DISPLACED:
            self.displaced.pop(next(iter(self.displaced)))
        self.displaced[peer.identity] = peer.rank

    def expired(self, now: float, timeout_s: float) -> list[RankPeer]:
        return [p for p in self.live if now - p.last_seen >= timeout_s]

    def next_deadline(self, timeout_s: float) -> float:
        return min((p.last_seen + timeout_s for p in self.live), default=math.inf)

    def live_ids(self) -> list[int]:
        return sorted(p.rank for p in self.live)


class Req:
    """One request between ``Submit`` and its final output.

    ``request_id`` names the current dispatch attempt: a request sent to another rank (its
    rank died, or it migrates) gets a new one, so whatever the old attempt still sends is
    never taken for the new one's. ``body`` is the request body frame to dispatch (the
    client's, or after a migration its continuation), kept until the final output;
    ``streamed`` is what the client has seen of a streaming request's output since ``body``
    was made (``None`` until a partial output), from which a migration builds the next
    continuation (``migration.continuation``).
    """

    __slots__ = (
        "aborted", "body", "client", "client_request_id", "deadline", "keys", "migrations", "pinned",
        "rank", "request_id", "route", "stream", "streamed",
    )  # fmt: skip

    def __init__(
        self,
        request_id: int,
        client: ClientPeer,
        client_request_id: int,
        body: Any,
        stream: bool,
        pinned: int,
    ) -> None:
        self.request_id = request_id
        self.client = client
        self.client_request_id = client_request_id
        self.body = body
        self.stream = stream
        self.pinned = pinned
        self.rank: RankPeer | None = None
        self.deadline = 0.0
        self.aborted = False
        """The client aborted it and its rank has not answered yet: never re-dispatched."""
        self.streamed: Streamed | None = None
        self.migrations = 0
        """Times it moved to another rank after streaming output (``--migration-limit``)."""
        self.keys = b""
        """Its packed prefix keys (``cache_aware`` only): a re-dispatch is routed on them again."""
        self.route: protocol.RouteInfo | None = None
        """Why it went to its rank (``cache_aware`` only), sent with its final output."""


class PendingQueue:
    """Requests with no live rank to go to, oldest first; each fails at its ``deadline``.

    Every entry waits the same ``no_rank_timeout_s``, so arrival order is deadline order.
    Entries whose request finished meanwhile (aborted, failed) are skipped lazily.
    """

    def __init__(self) -> None:
        self._queue: deque[Req] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, req: Req, deadline: float) -> None:
        req.rank = None
        req.deadline = deadline
        self._queue.append(req)

    def pop_oldest(self) -> Req:
        return self._queue.popleft()

    def take_all(self) -> list[Req]:
        reqs = list(self._queue)
        self._queue.clear()
        return reqs

    def expired(self, now: float) -> list[Req]:
        out: list[Req] = []
        while self._queue and self._queue[0].deadline <= now:
            out.append(self._queue.popleft())
        return out

    def next_deadline(self) -> float | None:
        return self._queue[0].deadline if self._queue else None
