"""Which routing keys the rank's radix cache holds: the source of its cache reports.

A request carries ``(key, num_tokens)`` pairs (``TokenizedRequest.cache_keys``, computed by
the tokenizer: key ``j`` of ``protocol.prefix_keys`` is held once the first ``num_tokens``
prompt tokens have KV in the tree). When the request's KV enters the tree, ``KVManager``
tags each covered key on the tree node holding its last token (``RadixCache.tag``); when
eviction removes a node, its keys come back here (``untag``). A key is held while at least
one node carries it (two requests may cache the same text with different token paths).

``take`` returns the keys that became held and stopped being held since the last call (an
``(inserted, evicted)`` pair, both bounded by ``MAX_TRACKED``), and whether everything was
dropped (``reset``: suspend, weight update). At most ``MAX_TRACKED`` keys are held; past it
new keys are not tagged (never reported, so never routed to: conservative).
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_TRACKED = 1 << 17


class CacheKeyTracker:
    def __init__(self, limit: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.counts: dict[int, int] = {}
        """key -> nodes carrying it."""
        self._inserted: dict[int, None] = {}
        self._evicted: dict[int, None] = {}
        self._reset = False

    @property
    def full(self) -> bool:
        return len(self.counts) >= self.limit

    def tagged(self, keys: Iterable[int]) -> None:
        counts = self.counts
        for key in keys:
            n = counts.get(key, 0)
            counts[key] = n + 1
            if n == 0:
                if key in self._evicted:
                    del self._evicted[key]
                else:
                    self._inserted[key] = None

    def untag(self, keys: Iterable[int]) -> None:
        counts = self.counts
        for key in keys:
            n = counts.get(key, 0)
            if n > 1:
                counts[key] = n - 1
            elif n == 1:
                del counts[key]
                if key in self._inserted:
                    del self._inserted[key]
                else:
                    self._evicted[key] = None

    def reset(self) -> None:
        """The tree was emptied: every key stops being held."""
        self.counts.clear()
        self._inserted.clear()
        self._evicted.clear()
        self._reset = True

    def take(self) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """``(inserted, evicted, reset)`` since the last call, or None if nothing changed."""
        if not (self._inserted or self._evicted or self._reset):
            return None
        out = (tuple(self._inserted), tuple(self._evicted), self._reset)
        self._inserted, self._evicted, self._reset = {}, {}, False
        return out
