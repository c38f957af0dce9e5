"""The request path: route submissions to ranks, outputs to clients, aborts, and failures.

The hot path (``submit``, ``engine_outputs``) does a couple of dict operations per request
and never logs: each request gets a server-side id, one ``Req`` record in ``requests`` (by
our id) and in its client's table (by the client's id), and its body frame is batched for
the chosen rank untouched. Every request ends with exactly one final output to its client:
the rank's, or one made here (pinned rank unknown or dead, no rank in time, engines stopped,
migration limit reached, coordinator shutting down).

Server request ids name dispatch attempts: they start at a random 62-bit value in every
coordinator process (so a rank still holding ids of a previous incarnation never matches a
new request) and a request gets a fresh one whenever it is sent to a rank again, so the
outputs of a superseded attempt (an abort final of a rank that was declared dead and came
back) are dropped, never delivered as the new attempt's.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from dpinfer import protocol
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.lifecycle import Lifecycle
from dpinfer.coordinator.migration import Streamed, continuation
from dpinfer.coordinator.outbox import Counters, Outbox
from dpinfer.coordinator.registry import ClientPeer, PendingQueue, RankPeer, RankRegistry, Req
from dpinfer.coordinator.routing import PINNED, make_policy
from dpinfer.errors import InvalidRequestError, ProtocolError
from dpinfer.protocol import NO_RANK, EngineState, ErrorCode, FinishReason, error_body

STOPPED_MESSAGE = "engines are stopped; start or register a rank to serve again"


class Forwarder:
    """Owns the in-flight table and the queue of requests waiting for a rank."""

    def __init__(
        self,
        config: CoordinatorConfig,
        registry: RankRegistry,
        outbox: Outbox,
        counters: Counters,
        lifecycle: Lifecycle,
    ) -> None:
        self.requests: dict[int, Req] = {}
        self.pending = PendingQueue()
        self.policy = make_policy(config.routing, config)
        self.no_rank_timeout_s = config.no_rank_timeout_s
        self.max_requests = config.max_queued_requests
        self.max_client_requests = config.max_client_requests
        self.migration_limit = config.migration_limit
        self._registry = registry
        self._outbox = outbox
        self._counters = counters
        self._lifecycle = lifecycle
        self._next_request_id = first_request_id()

    # ------------------------------------------------------------------ hot path

    def submit(
        self, client: ClientPeer, entries: Sequence[protocol.SubmitEntry], bodies: list[Any], now: float
    ) -> None:
        """Route each ``(client_request_id, rank, stream, prefix_keys, group)`` entry with its
        body. The completions of one prompt (a ``group`` != 0, consecutive) go where the first
        went while it has credit: its rank prefills their prompt once."""
        self._counters.submitted += len(entries)
        if self._lifecycle.state is EngineState.STOPPED:
            for entry in entries:
                self._reply_error(client, entry[0], STOPPED_MESSAGE, ErrorCode.UNAVAILABLE)
            return
        live = self._registry.live
        pick = self.policy.pick
        keyed = self.policy.keyed
        requests = self.requests
        client_requests = client.requests
        to_ranks = self._outbox.to_ranks
        request_id = self._next_request_id
        last_group, last_peer, last_route = 0, None, None
        for (client_request_id, pinned, stream, keys, group), body in zip(entries, bodies, strict=True):
            if client_request_id in client_requests:
                self._outbox.send(
                    client.identity,
                    protocol.Error(
                        "duplicate_request",
                        f"request id {client_request_id} is already in flight",
                        client_request_id,
                    ),
                )
                continue
            if len(requests) >= self.max_requests or len(client_requests) >= self.max_client_requests:
                self._overloaded(client, client_request_id)
                continue
            req = Req(request_id, client, client_request_id, body, stream, pinned)
            if pinned != NO_RANK:
                peer = self._registry.by_rank.get(pinned)
                if peer is None or not peer.alive:
                    self._reply_error(
                        client, client_request_id, self._no_such_rank(pinned), ErrorCode.UNAVAILABLE
                    )
                    continue
                if keyed:
                    req.route = PINNED
            elif group and group == last_group and last_peer and last_peer.in_flight < last_peer.credit:
                peer = last_peer  # another completion of the prompt just sent there
                if keyed:
                    req.keys = keys
                    req.route = last_route and last_route._replace(reason="group")
            else:
                if keyed:
                    req.keys = keys
                    peer = self._pick_keyed(req, live)
                else:
                    peer = pick(live) if live else None
                    if peer is not None and peer.in_flight >= peer.credit:
                        peer = with_room(live)  # the pick is full: any rank with credit left
                if peer is None:  # no live rank, or none with credit: wait in the hub's queue
                    requests[request_id] = req
                    client_requests[client_request_id] = req
                    self.pending.push(req, now + self.no_rank_timeout_s)
                    request_id += 1
                    last_group, last_peer = group, None
                    continue
            requests[request_id] = req
            client_requests[client_request_id] = req
            request_id += 1
            req.rank = peer
            peer.in_flight += 1
            last_group, last_peer, last_route = group, peer, req.route
            batch = to_ranks.get(peer.identity)
            if batch is None:
                batch = to_ranks[peer.identity] = ([], [])
            batch[0].append((req.request_id, stream))
            batch[1].append(body)
        self._next_request_id = request_id

    def _pick_keyed(self, req: Req, live: Sequence[RankPeer]) -> RankPeer | None:
        """The keyed policy's rank for ``req`` (its explanation kept for the final output)."""
        if not live:
            return None
        peer, route = self.policy.pick_keyed(live, req.keys)
        req.route = route
        if peer.in_flight < peer.credit:
            return peer
        room = with_room(live)
        if room is not None:
            req.route = route._replace(matched_chars=0, reason="credit")
        return room

    def engine_outputs(
        self, peer: RankPeer, entries: Sequence[tuple[int, bool, int]], bodies: list[Any]
    ) -> None:
        """Forward a rank's outputs to their clients; finals retire their requests.

        The routing explanation (keyed policies) goes with a request's final output and with
        the first output of each attempt of a stream (what the HTTP front's header needs).
        """
        requests = self.requests
        to_clients = self._outbox.to_clients
        finished = self.policy.finished
        rank = peer.rank
        stale: list[int] = []
        num_final = 0
        for (request_id, final, _), body in zip(entries, bodies, strict=True):
            req = requests.get(request_id)
            if req is None or req.rank is not peer:
                # Re-dispatched elsewhere or already failed (this rank was declared dead).
                if not final:
                    stale.append(request_id)
                continue
            client = req.client
            first = False
            if final:
                del requests[request_id]
                client.requests.pop(req.client_request_id, None)
                num_final += 1
                if req.keys:
                    finished(peer, req.keys)  # ends what is still pending from it (not reported)
            elif req.stream:
                streamed = req.streamed
                if streamed is None:
                    streamed = req.streamed = Streamed()
                    first = True
                streamed.add(body)  # what a migration continues from
            if client.closed:
                continue
            batch = to_clients.get(client.identity)
            if batch is None:
                batch = to_clients[client.identity] = ([], [])
            if (final or first) and req.route is not None:
                batch[0].append((req.client_request_id, final, rank, req.route))
            else:
                batch[0].append((req.client_request_id, final, rank))
            batch[1].append(body)
        if num_final:
            peer.in_flight -= num_final
            peer.completed += num_final
            self._counters.completed += num_final
            if self.pending:
                self._refill(peer)
        if stale:
            self._outbox.send(peer.identity, protocol.EngineAbort(tuple(stale)))

    # ------------------------------------------------------------------ cold paths

    def abort(self, client: ClientPeer, client_request_ids: Sequence[int]) -> None:
        """Abort requests by the client's ids; unknown (e.g. finished) ids are ignored."""
        per_rank: dict[RankPeer, list[int]] = {}
        for client_request_id in client_request_ids:
            req = client.requests.get(client_request_id)
            if req is None:
                continue
            self._counters.aborted += 1
            if req.rank is None:
                self.fail(req, "aborted before reaching a rank", FinishReason.ABORT)
            else:
                per_rank.setdefault(req.rank, []).append(req.request_id)
                req.aborted = True
        for peer, request_ids in per_rank.items():
            # The rank answers each with a final output (finish_reason "abort").
            self._outbox.send(peer.identity, protocol.EngineAbort(tuple(request_ids)))

    def client_gone(self, client: ClientPeer) -> None:
        """A client said goodbye: abort its requests and send it nothing more."""
        self.abort(client, list(client.requests))
        client.closed = True

    def rank_gone(self, peer: RankPeer, reason: str, died: bool, now: float) -> None:
        """Re-dispatch, migrate or fail every request ``peer`` held.

        ``died``: it died, was declared dead or handed its work back (it terminated on its
        own); otherwise it left on purpose (STOP) or registered again as another rank id. A
        request goes to another rank when the rank died, it was not pinned, and the deployment
        is not stopped: from the start if its client saw no output yet, else as a migration
        (its continuation), at most ``--migration-limit`` times. Otherwise it fails with a
        final reply that says why.
        """
        self._outbox.discard_rank(peer.identity)
        self.policy.forget(peer)
        owned = [req for req in self.requests.values() if req.rank is peer]
        peer.in_flight = 0
        stopped = self._lifecycle.state is EngineState.STOPPED
        for req in owned:
            req.rank = None
            streamed = req.streamed is not None and bool(req.streamed.token_ids)
            if req.aborted:
                self.fail(req, f"aborted (rank {peer.rank} went away before confirming)", FinishReason.ABORT)
            elif not died:
                self.fail(req, f"rank {peer.rank} left ({reason}) before finishing the request")
            elif stopped:
                self.fail(req, f"rank {peer.rank} died ({reason}) while engines were stopping")
            elif req.pinned != NO_RANK:
                self.fail(req, f"rank {peer.rank} (pinned) died: {reason}")
            elif not streamed:
                self._counters.redispatched += 1
                self._new_attempt(req)
                self._route(req, now)
            elif req.migrations >= self.migration_limit or req.streamed is None or req.streamed.broken:
                self.fail(
                    req,
                    f"rank {peer.rank} died ({reason}) mid-stream and the request already moved "
                    f"{req.migrations} time(s) (--migration-limit {self.migration_limit}); not moved again",
                )
            else:
                try:
                    req.body = continuation(req.body, req.streamed)
                except (InvalidRequestError, ProtocolError) as e:  # it streamed, so it was valid
                    self.fail(req, f"rank {peer.rank} died ({reason}) mid-stream; cannot continue: {e}")
                    continue
                req.streamed = None
                req.migrations += 1
                self._counters.migrated += 1
                self._new_attempt(req)
                self._route(req, now)

    def _new_attempt(self, req: Req) -> None:
        """Give ``req`` a fresh server id: what its previous attempt still sends is dropped."""
        self.requests.pop(req.request_id, None)
        req.request_id = self._next_request_id
        self._next_request_id += 1
        self.requests[req.request_id] = req

    def _route(self, req: Req, now: float) -> None:
        live = self._registry.live
        if self.policy.keyed:
            peer = self._pick_keyed(req, live)
        else:
            peer = self.policy.pick(live) if live else None
            if peer is not None and peer.in_flight >= peer.credit:
                peer = with_room(live)
        if peer is None:
            self.pending.push(req, now + self.no_rank_timeout_s)
            return
        self._send_to(req, peer)

    def _send_to(self, req: Req, peer: RankPeer) -> None:
        req.rank = peer
        peer.in_flight += 1
        batch = self._outbox.to_ranks.get(peer.identity)
        if batch is None:
            batch = self._outbox.to_ranks[peer.identity] = ([], [])
        batch[0].append((req.request_id, req.stream))
        batch[1].append(req.body)

    def dispatch_pending(self, now: float) -> None:
        """Route every waiting request (a rank just registered)."""
        if not self._registry.live:
            return
        for req in self.pending.take_all():
            if self.requests.get(req.request_id) is req:
                self._route(req, now)

    def _refill(self, peer: RankPeer) -> None:
        """``peer`` has credit again: give it the oldest waiting requests, as many as fit."""
        pending = self.pending
        while pending and peer.in_flight < peer.credit and peer.alive:
            req = pending.pop_oldest()
            if self.requests.get(req.request_id) is req:
                if req.route is not None:
                    req.route = req.route._replace(matched_chars=0, reason="credit")
                self._send_to(req, peer)

    def expire_pending(self, now: float) -> None:
        """Fail requests that waited ``no_rank_timeout_s`` for a live rank. While ranks are live
        (every one at its credit) they wait on, bounded by ``--max-queued-requests``."""
        waiting_for_credit = bool(self._registry.live)
        for req in self.pending.expired(now):
            if self.requests.get(req.request_id) is not req:
                continue
            if waiting_for_credit:
                self.pending.push(req, now + self.no_rank_timeout_s)
            else:
                self.fail(req, f"no engine rank became available within {self.no_rank_timeout_s:g} s")

    def fail_pending(self, message: str) -> None:
        for req in self.pending.take_all():
            if self.requests.get(req.request_id) is req:
                self.fail(req, message)

    def fail_all(self, message: str) -> None:
        self.pending.take_all()
        for req in list(self.requests.values()):
            self.fail(req, message)

    def fail(self, req: Req, message: str, reason: FinishReason = FinishReason.ERROR) -> None:
        """End ``req`` with a final output made here (an error or abort body)."""
        self.requests.pop(req.request_id, None)
        req.client.requests.pop(req.client_request_id, None)
        if req.rank is not None:
            req.rank.in_flight -= 1
            req.rank = None
        if reason is FinishReason.ERROR:
            self._counters.failed += 1
        if not req.client.closed:
            self._outbox.output(
                req.client.identity, req.client_request_id, True, NO_RANK, error_body(message, reason)
            )

    def _reply_error(self, client: ClientPeer, client_request_id: int, message: str, code: ErrorCode) -> None:
        self._counters.failed += 1
        self._outbox.output(client.identity, client_request_id, True, NO_RANK, error_body(message, code=code))

    def _overloaded(self, client: ClientPeer, client_request_id: int) -> None:
        self._counters.overloaded += 1
        if len(client.requests) >= self.max_client_requests:
            why = (
                f"this client has {len(client.requests)} requests queued or in flight (--max-client-requests)"
            )
        else:
            why = f"the coordinator holds {len(self.requests)} requests (--max-queued-requests)"
        message = f"overloaded: {why}; retry later"
        body = error_body(message, code=ErrorCode.OVERLOADED)
        self._outbox.output(client.identity, client_request_id, True, NO_RANK, body)

    def _no_such_rank(self, rank: int) -> str:
        live = ", ".join(str(r) for r in self._registry.live_ids()) or "none"
        return f"rank {rank} is not registered or not alive (live ranks: {live})"


def first_request_id() -> int:
    """A random start for this coordinator's server request ids (below 2**62, never 0)."""
    return secrets.randbits(62) | 1


def with_room(ranks: Sequence[RankPeer]) -> RankPeer | None:
    """The least loaded of the ranks with credit left (in flight below what it advertised)."""
    best: RankPeer | None = None
    for peer in ranks:
        if peer.in_flight < peer.credit and (best is None or peer.in_flight < best.in_flight):
            best = peer
    return best
