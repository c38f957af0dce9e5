"""Which rank's prefix cache holds which prefix key: exactly what the ranks reported.

The index changes only on a rank's ``CacheReport`` (keys its radix cache started or stopped
holding) and when a rank goes away or registers again (its keys are forgotten: a new
registration starts empty and attracts no prefix traffic until it reports holding some).
Nothing here is guessed from where requests were sent.

Bounded: at most ``MAX_KEYS_PER_RANK`` keys per rank and ``MAX_KEYS_TOTAL`` over all ranks;
past either bound the rank's oldest reported keys are dropped first (forgetting a key only
makes routing less eager, never wrong). Costs: a report is O(its keys); ``match`` is one dict
lookup per key of the request, deepest first, stopping once every live rank is placed.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpinfer.coordinator.registry import RankPeer

MAX_KEYS_PER_RANK = 1 << 17
MAX_KEYS_TOTAL = 1 << 20


class PrefixIndex:
    def __init__(self, per_rank: int = MAX_KEYS_PER_RANK, total: int = MAX_KEYS_TOTAL) -> None:
        self.per_rank = per_rank
        self.total = total
        self.holders: dict[int, list[RankPeer]] = {}
        """key -> the ranks holding it (a short list: a prefix is on few ranks)."""
        self.by_rank: dict[RankPeer, dict[int, None]] = {}
        """rank -> its keys, oldest report first."""
        self.size = 0

    def report(self, peer: RankPeer, inserted: Sequence[int], evicted: Sequence[int], reset: bool) -> None:
        if reset:
            self.forget(peer)
        keys = self.by_rank.get(peer)
        if keys is None:
            if not inserted:
                return
            keys = self.by_rank[peer] = {}
        holders = self.holders
        for key in evicted:
            if key in keys:
                self._remove(peer, keys, key)
        for key in inserted:
            if key in keys:
                continue
            if len(keys) >= self.per_rank or self.size >= self.total:
                self._remove(peer, keys, next(iter(keys)))
            keys[key] = None
            self.size += 1
            ranks = holders.get(key)
            if ranks is None:
                holders[key] = [peer]
            else:
                ranks.append(peer)

    def _remove(self, peer: RankPeer, keys: dict[int, None], key: int) -> None:
        del keys[key]
        self.size -= 1
        ranks = self.holders[key]
        if len(ranks) == 1:
            del self.holders[key]
        else:
            ranks.remove(peer)

    def forget(self, peer: RankPeer) -> None:
        """Drop everything ``peer`` reported (it went away, or registered again)."""
        keys = self.by_rank.pop(peer, None)
        if not keys:
            return
        holders = self.holders
        for key in keys:
            ranks = holders[key]
            if len(ranks) == 1:
                del holders[key]
            else:
                ranks.remove(peer)
        self.size -= len(keys)

    def match(self, keys: Sequence[int], num_live: int) -> dict[RankPeer, int]:
        """rank -> how many leading keys of ``keys`` it holds (ranks holding none are absent)."""
        return deepest_matches(self.holders, keys, num_live)

    def held(self, peer: RankPeer) -> int:
        keys = self.by_rank.get(peer)
        return len(keys) if keys else 0


def deepest_matches(
    holders: dict[int, list[RankPeer]], keys: Sequence[int], num_live: int
) -> dict[RankPeer, int]:
    """rank -> how many leading keys of ``keys`` it has in ``holders`` (ranks with none absent).

    Scans from the deepest key; a rank's match is the deepest key it has (keys are a chain,
    so having ``keys[j]`` means having that whole prefix); stops once ``num_live`` ranks are
    placed.
    """
    found: dict[RankPeer, int] = {}
    for j in range(len(keys) - 1, -1, -1):
        ranks = holders.get(keys[j])
        if ranks is None:
            continue
        for peer in ranks:
            if peer not in found:
                found[peer] = j + 1
        if len(found) >= num_live:
            break
    return found
