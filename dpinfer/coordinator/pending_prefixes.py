"""Prefix keys the hub routed to a rank that the rank has not reported yet (provisional).

``cache_aware`` learns what a rank holds only from its reports, and a rank reports a prefix
after it has prefilled it. Until then, a burst of requests on that prefix would see no match
and spread by load, each missing the cache. So when the policy sends a keyed request to rank
``r``, it records here the request's keys that ``r`` does not already hold (reported or
pending) as *pending on r*, and later requests count a match on them for ``r``.

A pending entry ``(key, r)`` ends when:

- ``r`` reports the key inserted (it is then in the ``PrefixIndex``) or evicted;
- a request with that key finishes on ``r`` (``resolve``, from the final output) and ``r``
  has not reported it: its rank main sends the cache report of a prefill in the same loop
  turn as its outputs, so a rank that finished the request without reporting the key does
  not cache it (prefix caching off, or the KV went straight out again);
- ``r`` goes away or registers again (``forget``: a new registration starts empty);
- ``PENDING_TTL_S`` after it was recorded (never refreshed): a rank that queues a request for
  longer, or never reports it, stops attracting the prefix.

Bounded: at most ``MAX_PENDING`` entries; when full, the oldest entry is dropped first, as
if it had expired (forgetting an entry only makes routing less eager, never wrong). Costs:
``add`` is O(keys recorded); ``match`` is one dict lookup per key of the request, deepest
first, after dropping the expired entries (amortized O(1)); the policy skips both while the
table is empty, so a hot prefix whose rank already reported it costs nothing here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from dpinfer.coordinator.prefix_index import deepest_matches
from dpinfer.coordinator.registry import RankPeer

PENDING_TTL_S = 5.0
"""How long a pending entry lasts at most: a busy rank's queue wait plus a long prefill (the
report follows the prefill within one turn of the rank's loop)."""
MAX_PENDING = 1 << 16
"""Most ``(key, rank)`` entries at once (a few MB of hub memory)."""


class PendingPrefixes:
    def __init__(
        self,
        ttl_s: float = PENDING_TTL_S,
        cap: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.cap = cap
        self.clock = clock
        self.holders: dict[int, list[RankPeer]] = {}
        """key -> the ranks it is pending on (a short list)."""
        self._expiry: OrderedDict[tuple[int, RankPeer], float] = OrderedDict()
        """(key, rank) -> when it expires, oldest first (one TTL for all: also deadline order)."""

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, peer: RankPeer, keys: Sequence[int]) -> None:
        """``keys`` were routed to ``peer``, which has not reported them (already pending: kept as is)."""
        expiry, holders = self._expiry, self.holders
        deadline = self.clock() + self.ttl_s
        for key in keys:
            entry = (key, peer)
            if entry in expiry:
                continue
            if len(expiry) >= self.cap:
                self._drop(expiry.popitem(last=False)[0])
            expiry[entry] = deadline
            ranks = holders.get(key)
            if ranks is None:
                holders[key] = [peer]
            else:
                ranks.append(peer)

    def match(self, keys: Sequence[int], num_live: int) -> dict[RankPeer, int]:
        """rank -> how many leading keys of ``keys`` are pending on it (as ``PrefixIndex.match``)."""
        self.expire()
        return deepest_matches(self.holders, keys, num_live)

    def expire(self) -> None:
        expiry = self._expiry
        if not expiry:
            return
        now = self.clock()
        while expiry:
            entry, deadline = next(iter(expiry.items()))
            if deadline > now:
                return
            del expiry[entry]
            self._drop(entry)

    def resolve(self, peer: RankPeer, keys: Sequence[int]) -> None:
        """End the entries of ``keys`` on ``peer``: it reported them, or a request with them finished."""
        holders, expiry = self.holders, self._expiry
        for key in keys:
            ranks = holders.get(key)
            if ranks is not None and peer in ranks:
                del expiry[(key, peer)]
                self._drop((key, peer))

    def forget(self, peer: RankPeer) -> None:
        """``peer`` went away or registered again: nothing is pending on it any more."""
        expiry = self._expiry
        for entry in [entry for entry in expiry if entry[1] is peer]:
            del expiry[entry]
            self._drop(entry)

    def pending_on(self, peer: RankPeer) -> int:
        """Keys pending on ``peer`` (``status``, tests; O(entries))."""
        return sum(1 for _, p in self._expiry if p is peer)

    def _drop(self, entry: tuple[int, RankPeer]) -> None:
        """Remove an entry already taken out of ``_expiry`` from ``holders``."""
        key, peer = entry
        ranks = self.holders[key]
        if len(ranks) == 1:
            del self.holders[key]
        else:
            ranks.remove(peer)
