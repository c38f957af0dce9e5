"""KV pool sizing, slot allocation and the request->slot table (no model needed)."""

from __future__ import annotations

import os

import pytest
import torch

from dpinfer.config import ConfigError, SchedulerConfig
from dpinfer.runner.kv_pool import (
    KVLayout,
    KVPool,
    ReqToTokenPool,
    SlotAllocator,
    available_memory_bytes,
    kv_pool_tokens,
)

CPU = torch.device("cpu")
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)


def test_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert LAYOUT.bytes_per_token == 2 * 4 * 2 * 64 * 4
    half = KVLayout(4, 2, 64, torch.bfloat16)
    assert half.bytes_per_token == LAYOUT.bytes_per_token // 2


def test_pool_size_from_bytes_and_cap() -> None:
    cfg = SchedulerConfig(kv_cache_bytes=LAYOUT.bytes_per_token * 1000)
    assert kv_pool_tokens(cfg, LAYOUT, CPU) == 1000
    capped = SchedulerConfig(kv_cache_bytes=LAYOUT.bytes_per_token * 1000, max_kv_tokens=300)
    assert kv_pool_tokens(capped, LAYOUT, CPU) == 300


def test_pool_size_from_fraction_of_available_memory() -> None:
    free = available_memory_bytes(CPU)
    assert free > 0
    tokens = kv_pool_tokens(SchedulerConfig(kv_cache_fraction=0.01), LAYOUT, CPU)
    expected = int(free * 0.01) // LAYOUT.bytes_per_token
    assert abs(tokens - expected) <= expected * 0.2 + 16  # MemAvailable moves a little


def test_too_small_pool_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kv-cache-bytes"):
        kv_pool_tokens(SchedulerConfig(kv_cache_bytes=LAYOUT.bytes_per_token * 3), LAYOUT, CPU)


def test_allocator_hands_out_each_slot_once_and_never_slot_zero() -> None:
    alloc = SlotAllocator(10, CPU)
    a = alloc.alloc(4)
    b = alloc.alloc(6)
    assert a is not None and b is not None
    got = sorted(a.tolist() + b.tolist())
    assert got == list(range(1, 11))
    assert alloc.alloc(1) is None, "pool exhausted"
    assert alloc.num_free == 0 and alloc.num_used == 10


def test_allocator_failure_takes_nothing_and_frees_come_back() -> None:
    alloc = SlotAllocator(8, CPU)
    first = alloc.alloc(5)
    assert first is not None
    assert alloc.alloc(4) is None
    assert alloc.num_free == 3
    alloc.free(first[:2])
    alloc.free(first[2:])
    assert alloc.num_free == 8
    again = alloc.alloc(8)
    assert again is not None and sorted(again.tolist()) == list(range(1, 9))
    alloc.clear()
    assert alloc.num_free == 8


def test_kv_pool_release_and_allocate_keep_shape_and_zero_pad_slot() -> None:
    pool = KVPool(LAYOUT, 32, CPU)
    assert len(pool.k_buffers) == 4 and pool.k_buffers[0].shape == (33, 2, 64)
    assert torch.count_nonzero(pool.v_buffers[3][0]) == 0, "slot 0 is the padding slot"
    pool.release()
    assert not pool.allocated and pool.k_buffers == []
    pool.allocate()
    assert pool.allocated and pool.v_buffers[0].shape == (33, 2, 64)
    assert torch.count_nonzero(pool.k_buffers[0][0]) == 0


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_kv_pool_prefault_commits_the_memory_at_allocation() -> None:
    slots = 16383  # 8 buffers of 8 MiB (with slot 0): far above what touching slot 0 maps
    before = _resident_bytes()
    lazy = KVPool(LAYOUT, slots, CPU)
    lazy_growth = _resident_bytes() - before
    assert lazy_growth < lazy.size_bytes // 2, "without prefault only slot 0 is written"
    del lazy
    before = _resident_bytes()
    pool = KVPool(LAYOUT, slots, CPU, prefault=True)
    assert _resident_bytes() - before >= 0.9 * pool.size_bytes
    assert all(torch.count_nonzero(b) == 0 for b in pool.k_buffers + pool.v_buffers)
    for b in pool.k_buffers + pool.v_buffers:
        b.fill_(1.0)
    pool.release()
    pool.allocate()  # resume writes every buffer again (the allocator may hand back old memory)
    assert all(torch.count_nonzero(b) == 0 for b in pool.k_buffers + pool.v_buffers)


def test_req_to_token_rows_are_reused() -> None:
    rows = ReqToTokenPool(2, 16, CPU)
    a, b = rows.alloc(), rows.alloc()
    assert {a, b} == {0, 1} and rows.alloc() is None
    rows.free(a)
    assert rows.alloc() == a
    assert rows.req_to_token.shape == (2, 16)
