"""Routing policies: which live rank gets the next request.

Add a policy by subclassing ``RoutingPolicy`` and decorating it with ``@register_policy``;
``make_policy(name, config)`` builds one by name (a bad name lists the valid ones). The names
match ``config.RoutingPolicyName``.

``cache_aware`` (SGLang's name) routes on the prompt's prefix keys (``protocol.prefix_keys``,
computed by the client, carried in ``SubmitEntry.prefix_keys``) against a ``PrefixIndex`` fed
by the ranks' cache reports. Its cost model, per live rank ``r``:

- ``match_r``: characters of the prompt's leading blocks that rank ``r`` reported holding,
  or that are *pending* on ``r``, whichever is longer (0 when none); ``load_r``: the hub's
  exact in-flight count of ``r``;
- ``score_r = match_r - cache_load_chars * load_r``: one more request in flight costs as
  much as recomputing ``--cache-load-chars`` characters of prompt (default 256);
- the best score wins (ties: the lower load, then the reported match over a pending one,
  then rotation). No rank holding (or pending) any block: the least-loaded rank with
  rotating tie-breaks, exactly ``least_loaded`` (reason ``load``);
- **anti-hotspot**: when the winner's load exceeds the least-loaded rank's by
  ``--cache-spread-threshold`` requests or more (default 4), the request goes to the
  least-loaded rank instead (the longest match among those; reason ``spread``). Its prefill
  caches the prefix there, that rank reports it, and later requests of a hot prefix then
  see equal matches on both ranks and split by load.

**Pending prefixes** (``pending_prefixes``): a rank reports a prefix only after it prefilled
it, so when a request goes to ``r`` by ``match``, ``pending`` or ``load``, the keys of its
prompt that ``r`` neither holds nor has pending are recorded as pending on ``r``, and a burst
of requests on one new prefix follows the first to ``r`` (reason ``pending``: the winner's
longest match is pending, not yet reported; ``matched_chars`` counts it). Nothing is recorded
for a ``spread`` choice (the prefix is on its way into another rank's cache already; the
spread rank reports it after its prefill, as above), nor for a rank at its credit (the hub
sends the request to another rank). A pending entry ends when ``r`` reports the key, when a
request with it finishes on ``r`` without a report, when ``r`` is forgotten, or
``PENDING_TTL_S`` (5 s) after it was recorded; the table holds at most ``MAX_PENDING``
entries (the oldest dropped first). The index itself stays exactly what the ranks reported.
Under ``--deterministic`` the choices depend on time only through that TTL.

Each choice is explained (``protocol.RouteInfo``: policy, matched characters, reason) and the
hub sends the explanation with the request's final output (``GenerationResult.routing``) and
with a stream's first output (``StreamDelta.routing``, the HTTP front's header).
The hub never hashes or tokenizes a body: a request without keys (a client that sends none,
``model_inputs``) goes by load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from dpinfer import protocol
from dpinfer.config import ConfigError, CoordinatorConfig
from dpinfer.coordinator.pending_prefixes import PendingPrefixes
from dpinfer.coordinator.prefix_index import PrefixIndex
from dpinfer.coordinator.registry import RankPeer
from dpinfer.protocol import prefix_keys
from dpinfer.protocol.cache_report import MAX_REPORT_KEYS


class RoutingPolicy:
    """Picks the rank for one request.

    Contract:

    - ``pick(ranks)`` gets the live ranks, non-empty, in a stable order (registration order,
      or rank id order under ``--deterministic``) and returns one of them. It runs on the hot
      path once per request: O(len(ranks)), no I/O, no logging, no allocation worth noting.
    - It must not mutate the peers. It may read ``RankPeer.in_flight`` (the coordinator's
      exact count of requests sent to that rank and not yet finished: queued plus running)
      and the last heartbeat's load figures (informational, possibly stale).
    - Given the same sequence of calls with the same ranks and loads it returns the same
      sequence of ranks (``--deterministic`` relies on this); it may keep a cursor.
    """

    name: ClassVar[str]
    keyed: ClassVar[bool] = False
    """Routes on prefix keys: the hub calls ``pick_keyed`` and passes it cache reports."""

    def __init__(self, config: CoordinatorConfig | None = None) -> None:
        self._cursor = 0

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        raise NotImplementedError

    def pick_keyed(self, ranks: Sequence[RankPeer], keys: bytes) -> tuple[RankPeer, protocol.RouteInfo]:
        """The rank for a request with packed prefix ``keys``, and why (``keyed`` policies)."""
        raise NotImplementedError

    def on_report(self, peer: RankPeer, msg: protocol.CacheReport) -> None:
        """A rank's cache report (``keyed`` policies)."""

    def forget(self, peer: RankPeer) -> None:
        """``peer`` went away or registered again: forget what it reported."""

    def finished(self, peer: RankPeer, keys: bytes) -> None:
        """A request with packed prefix ``keys`` had its final output from ``peer`` (``keyed``)."""

    def held(self, peer: RankPeer) -> int:
        """Prefix keys ``peer`` reported holding (``status``)."""
        return 0


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, config: CoordinatorConfig | None = None) -> RoutingPolicy:
    """A new policy instance; ``ConfigError`` naming the valid policies for an unknown name."""
    cls = POLICIES.get(str(name))
    if cls is None:
        raise ConfigError(f"--routing: {name!r} is not one of: {', '.join(sorted(POLICIES))}")
    return cls(config)


@register_policy
class RoundRobin(RoutingPolicy):
    """Each request to the next rank in order (the default)."""

    name = "round_robin"

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        cursor = self._cursor
        self._cursor = cursor + 1
        return ranks[cursor % len(ranks)]


@register_policy
class LeastLoaded(RoutingPolicy):
    """The rank with the fewest in-flight requests; ties go to the next rank in rotation.

    Rotating tie-breaks keep low load spread (a lowest-index tie-break would send every
    request to the first rank whenever all are idle). Load is the coordinator's exact
    ``in_flight`` count, never a late heartbeat figure.
    """

    name = "least_loaded"

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        return ranks[self._least_loaded(ranks)]

    def _least_loaded(self, ranks: Sequence[RankPeer]) -> int:
        n = len(ranks)
        start = self._cursor % n
        best_index = start
        best_load = ranks[start].in_flight
        for offset in range(1, n):
            i = (start + offset) % n
            load = ranks[i].in_flight
            if load < best_load:
                best_index, best_load = i, load
        self._cursor = best_index + 1
        return best_index


@register_policy
class CacheAware(LeastLoaded):
    """The rank whose prefix cache holds the longest match, weighed against load (see the module)."""

    name = "cache_aware"
    keyed = True

    def __init__(self, config: CoordinatorConfig | None = None) -> None:
        super().__init__(config)
        config = config or CoordinatorConfig()
        self.index = PrefixIndex()
        self.pending = PendingPrefixes()
        self.load_chars = config.cache_load_chars
        self.spread_threshold = config.cache_spread_threshold
        self._block = prefix_keys.BLOCK_CHARS

    def on_report(self, peer: RankPeer, msg: protocol.CacheReport) -> None:
        inserted = prefix_keys.unpack(msg.inserted[: MAX_REPORT_KEYS * prefix_keys.KEY_BYTES])
        evicted = prefix_keys.unpack(msg.evicted[: MAX_REPORT_KEYS * prefix_keys.KEY_BYTES])
        self.index.report(peer, inserted, evicted, msg.reset)
        if self.pending:
            self.pending.resolve(peer, inserted)
            self.pending.resolve(peer, evicted)

    def finished(self, peer: RankPeer, keys: bytes) -> None:
        if self.pending:
            self.pending.resolve(peer, prefix_keys.unpack(keys[: prefix_keys.MAX_KEYS_BYTES]))

    def forget(self, peer: RankPeer) -> None:
        self.index.forget(peer)
        self.pending.forget(peer)

    def held(self, peer: RankPeer) -> int:
        return self.index.held(peer)

    def pick_keyed(self, ranks: Sequence[RankPeer], keys: bytes) -> tuple[RankPeer, protocol.RouteInfo]:
        index, pending = self.index, self.pending
        n = len(ranks)
        chain = prefix_keys.unpack(keys[: prefix_keys.MAX_KEYS_BYTES]) if keys else []
        found = index.match(chain, n) if chain else {}
        matches = found
        if chain and pending:
            soon = pending.match(chain, n)
            if soon:
                matches = dict(found)
                for peer, j in soon.items():
                    if j > matches.get(peer, 0):
                        matches[peer] = j
        start = self._cursor % n
        if not matches:
            # Least loaded; among equally loaded ranks the one caching least (SGLang's smallest
            # tree), so new prefixes spread over the caches; then rotation.
            best_i = start
            best_key = (ranks[start].in_flight, index.held(ranks[start]))
            for offset in range(1, n):
                i = (start + offset) % n
                key = (ranks[i].in_flight, index.held(ranks[i]))
                if key < best_key:
                    best_i, best_key = i, key
            self._cursor = best_i + 1
            best = ranks[best_i]
            if chain and best.in_flight < best.credit:
                pending.add(best, chain)
            return best, _LOAD
        block, load_chars = self._block, self.load_chars
        best_i = least_i = start
        peer = ranks[start]
        best_score = matches.get(peer, 0) * block - load_chars * peer.in_flight
        for offset in range(1, n):
            i = (start + offset) % n
            peer = ranks[i]
            load = peer.in_flight
            matched = matches.get(peer, 0)
            score = matched * block - load_chars * load
            best = ranks[best_i]
            if score > best_score or (  # ties: the lower load, then a reported match over a pending one
                score == best_score and (load, -found.get(peer, 0)) < (best.in_flight, -found.get(best, 0))
            ):
                best_i, best_score = i, score
            least = ranks[least_i]
            if load < least.in_flight or (load == least.in_flight and matched > matches.get(least, 0)):
                least_i = i
        best, least = ranks[best_i], ranks[least_i]
        if best.in_flight - least.in_flight >= self.spread_threshold:
            self._cursor = least_i + 1
            return least, protocol.RouteInfo(self.name, matches.get(least, 0) * block, "spread")
        self._cursor = best_i + 1
        matched = matches.get(best, 0)
        if matched < len(chain) and best.in_flight < best.credit:
            pending.add(best, chain[matched:])
        if not matched:
            return best, _LOAD
        reason = "match" if found.get(best, 0) >= matched else "pending"
        return best, protocol.RouteInfo(self.name, matched * block, reason)


_LOAD = protocol.RouteInfo(CacheAware.name, 0, "load")
PINNED = protocol.RouteInfo(CacheAware.name, 0, "pinned")
