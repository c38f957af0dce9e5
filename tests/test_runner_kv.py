"""KV pool sizing, slot allocation and the request->slot table (no model needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


PREFAULT_PROBE = """
import json, torch
from dpinfer.runner.kv_pool import KVLayout, KVPool

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, dtype=torch.float32)
slots = (40 << 20) // (2 * 64 * 4)  # two 40 MiB buffers: fresh mappings, counted once touched
growth = {}
before = resident()
lazy = KVPool(layout, slots, torch.device("cpu"))
growth["lazy"] = resident() - before
del lazy
before = resident()
pool = KVPool(layout, slots, torch.device("cpu"), prefault=True)
growth["prefault"] = resident() - before
pool.release()
before = resident()
pool.allocate()
growth["resume"] = resident() - before
growth["zero"] = all(torch.count_nonzero(b) == 0 for b in pool.k_buffers + pool.v_buffers)
growth["size"] = pool.size_bytes
print(json.dumps(growth))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_kv_pool_prefault_commits_the_memory_at_allocation() -> None:
    # In a fresh interpreter: here, memory freed by earlier tests may be handed back already
    # resident, which would hide whether the pool was written.
    done = subprocess.run(
        [sys.executable, "-c", PREFAULT_PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    size = growth["size"]
    assert growth["lazy"] < size // 4, "without prefault only slot 0 is written"
    assert growth["prefault"] >= 0.9 * size and growth["resume"] >= 0.9 * size
    assert growth["zero"]


def test_req_to_token_rows_are_reused() -> None:
    rows = ReqToTokenPool(2, 16, CPU)
    a, b = rows.alloc(), rows.alloc()
    assert {a, b} == {0, 1} and rows.alloc() is None
    rows.free(a)
    assert rows.alloc() == a
    assert rows.req_to_token.shape == (2, 16)
