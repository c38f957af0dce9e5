"""RadixCache: match, insert, split, namespaces, locks and LRU eviction (no model needed)."""

from __future__ import annotations

import torch

from dpinfer.runner.radix_cache import RadixCache


class FreeLog:
    def __init__(self) -> None:
        self.freed: list[int] = []

    def __call__(self, slots: torch.Tensor) -> None:
        self.freed.extend(slots.tolist())


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def make() -> tuple[RadixCache, FreeLog]:
    log = FreeLog()
    return RadixCache(log), log


def test_match_on_empty_cache_returns_nothing() -> None:
    cache, _ = make()
    found, node = cache.match_prefix([1, 2, 3])
    assert found.tolist() == [] and node.is_root
    assert cache.total_size == 0


def test_insert_then_match_full_and_partial_prefix() -> None:
    cache, _ = make()
    assert cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13)) == 0
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].tolist() == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 9])[0].tolist() == [10, 11]
    assert cache.match_prefix([7, 1, 2])[0].tolist() == []
    assert cache.evictable_size == 4


def test_insert_reports_already_cached_prefix_and_splits() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    # Shares [1, 2]: the caller's slots 20, 21 are duplicates, 22, 23 go to the tree.
    assert cache.insert([1, 2, 5, 6], slots(20, 21, 22, 23)) == 2
    assert cache.match_prefix([1, 2, 5, 6])[0].tolist() == [10, 11, 22, 23]
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == [10, 11, 12, 13]
    assert cache.total_size == 6
    assert sorted(cache.all_slots().tolist()) == [10, 11, 12, 13, 22, 23]


def test_match_that_ends_inside_a_node_splits_it_for_locking() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    found, node = cache.match_prefix([1, 2])
    assert found.tolist() == [10, 11]
    assert node.key == [1, 2]
    cache.inc_lock_ref(node)
    assert cache.protected_size == 2 and cache.evictable_size == 2
    # The unlocked tail [3, 4] can go; the locked head cannot.
    assert cache.evict(10) == 2
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == [10, 11]
    cache.dec_lock_ref(node)
    assert cache.protected_size == 0 and cache.evictable_size == 2


def test_lru_eviction_frees_least_recently_used_leaf_first() -> None:
    cache, log = make()
    cache.insert([1, 1, 1], slots(1, 2, 3))
    cache.insert([2, 2, 2], slots(4, 5, 6))
    cache.insert([3, 3, 3], slots(7, 8, 9))
    cache.match_prefix([1, 1, 1])  # touch: now [2, 2, 2] is the oldest
    assert cache.evict(1) == 3
    assert log.freed == [4, 5, 6]
    assert cache.match_prefix([2, 2, 2])[0].tolist() == []
    assert cache.match_prefix([1, 1, 1])[0].tolist() == [1, 2, 3]


def test_eviction_walks_up_to_parents_that_become_leaves() -> None:
    cache, log = make()
    cache.insert([1, 2, 3], slots(1, 2, 3))
    cache.insert([1, 2, 4], slots(9, 9, 4))
    assert cache.evict(100) == 4
    assert sorted(log.freed) == [1, 2, 3, 4]
    assert cache.total_size == 0


def test_locked_nodes_are_never_evicted() -> None:
    cache, log = make()
    cache.insert([5, 6, 7], slots(1, 2, 3))
    _, node = cache.match_prefix([5, 6, 7])
    cache.inc_lock_ref(node)
    cache.inc_lock_ref(node)
    assert cache.evict(3) == 0 and log.freed == []
    cache.dec_lock_ref(node)
    assert cache.evict(3) == 0, "still locked once"
    cache.dec_lock_ref(node)
    assert cache.evict(3) == 3 and log.freed == [1, 2, 3]


def test_namespaces_never_share_prefixes() -> None:
    cache, _ = make()
    cache.insert([1, 2, 3], slots(1, 2, 3), namespace=b"image-a")
    assert cache.match_prefix([1, 2, 3], namespace=b"image-b")[0].tolist() == []
    assert cache.match_prefix([1, 2, 3], namespace=None)[0].tolist() == []
    assert cache.match_prefix([1, 2, 3], namespace=b"image-a")[0].tolist() == [1, 2, 3]
    # Same tokens in another namespace are a separate copy.
    assert cache.insert([1, 2, 3], slots(4, 5, 6), namespace=b"image-b") == 0
    assert cache.total_size == 6


def test_evicting_a_namespace_empties_its_root() -> None:
    cache, _ = make()
    cache.insert([1, 2], slots(1, 2), namespace=b"h")
    assert cache.evict(2) == 2
    assert cache._roots == {}, "an emptied per-image root is dropped"


def test_reset_forgets_everything() -> None:
    cache, log = make()
    cache.insert([1, 2], slots(1, 2))
    cache.reset()
    assert cache.total_size == 0 and cache.match_prefix([1, 2])[0].tolist() == []
    assert log.freed == []
