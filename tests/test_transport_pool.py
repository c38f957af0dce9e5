"""MmItemMemoryPool on a CPU workspace: allocator, sync counters, recycler, and the codec's
``cuda_ipc_pool`` route (``wrap_mm_inputs_for_ipc`` / ``unwrap_mm_inputs_from_ipc``)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dpinfer.config import new_deployment_id, shm_name
from dpinfer.transport.allocator import BestFitAllocator
from dpinfer.transport.codec import unwrap_mm_inputs_from_ipc, wrap_mm_inputs_for_ipc
from dpinfer.transport.mm_pool import CudaIpcTensorTransportProxy, MmItemMemoryPool, close_opened_pools
from dpinfer.transport.shm import list_segments
from dpinfer.transport.sync_buffer import ShmSyncBuffer

CTX = mp.get_context("spawn")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


# ---------------------------------------------------------------------------- allocator


def test_allocator_alignment_best_fit_and_coalescing() -> None:
    alloc = BestFitAllocator(4096, alignment=256)
    a, b, c, d = (alloc.alloc(n) for n in (1, 300, 1000, 256))
    assert (a, b, c, d) == (0, 256, 768, 1792)  # every offset aligned, sizes rounded up
    assert alloc.block_size(b) == 512
    alloc.free(b)  # hole of 512 between a and c
    alloc.free(d)  # 256 at 1792 merges with the 2048-byte tail
    assert alloc.free_blocks() == [(256, 512), (1792, 2304)]
    assert alloc.alloc(400) == 256  # best fit takes the small hole, not the tail
    alloc.free(256)
    alloc.free(a)
    alloc.free(c)  # everything free again: one block
    assert alloc.free_blocks() == [(0, 4096)] and alloc.used_bytes == 0
    with pytest.raises(KeyError):
        alloc.free(c)  # double free is an error, not silent corruption


def test_allocator_fragmentation_is_recovered() -> None:
    alloc = BestFitAllocator(64 * 1024, alignment=1024)
    blocks = [alloc.alloc(1024) for _ in range(64)]
    assert alloc.alloc(1) is None
    for off in blocks[::2]:
        alloc.free(off)
    assert alloc.free_bytes == 32 * 1024 and alloc.largest_free_bytes == 1024
    assert alloc.alloc(2048) is None  # fragmented: half free, no two adjacent blocks
    for off in blocks[1::2]:
        alloc.free(off)
    assert alloc.num_free_blocks == 1 and alloc.alloc(64 * 1024) == 0


# ---------------------------------------------------------------------------- pool


@pytest.fixture
def pool() -> Any:
    p = MmItemMemoryPool.for_device(64 * 1024, "cpu", new_deployment_id(), 0, max_chunks=8)
    yield p
    p.shutdown()
    close_opened_pools()


def test_pool_full_returns_none_and_counts(pool: MmItemMemoryPool) -> None:
    chunk, view = pool.get_slice_with_flag(torch.ones(8 * 1024))  # 32 KiB
    assert chunk is not None and torch.equal(view, torch.ones(8 * 1024))
    assert pool.get_slice_with_flag(torch.ones(8 * 1024 + 1)) == (None, None)  # 32 KiB + 4 B
    assert pool.num_full == 1
    proxy = CudaIpcTensorTransportProxy.publish(pool, torch.ones(16 * 1024))
    assert proxy is None and pool.num_full == 2


def test_recycler_returns_acknowledged_chunks_only(pool: MmItemMemoryPool) -> None:
    x = torch.arange(4096, dtype=torch.float32)
    proxies = [CudaIpcTensorTransportProxy.publish(pool, x * i) for i in range(3)]
    assert all(proxies) and pool.used_bytes == 3 * 16384
    received = pickle.loads(pickle.dumps(proxies[1])).reconstruct_on_device()  # copy out + ack
    assert torch.equal(received, x)
    assert wait_until(lambda: pool.used_bytes == 2 * 16384), "the recycler did not free the acked chunk"
    assert pool.num_recycled == 1
    time.sleep(0.05)  # several recycler passes: unacknowledged chunks must stay
    assert pool.used_bytes == 2 * 16384 and sorted(pool.occupied) == [0, 2 * 16384]


def test_shutdown_stops_recycler_before_freeing(pool: MmItemMemoryPool) -> None:
    sync_name = pool.sync.name
    assert pool.recycler_alive
    pool.shutdown()
    assert not pool.recycler_alive and pool.workspace is None
    assert pool.allocate(10) is None
    assert all(sync_name != n for n in list_segments())


def test_sync_counter_increments_are_atomic_across_processes() -> None:
    sync = ShmSyncBuffer.create(shm_name(new_deployment_id(), 0, "synctest"), 4)
    try:
        sync.reset(2)
        ready, go = CTX.Event(), CTX.Event()
        proc = CTX.Process(target=bump, args=(sync.name, 2, 20_000, ready, go))
        proc.start()
        assert ready.wait(60), "child did not start"
        go.set()  # both sides now increment the same counter at the same time
        bump(sync.name, 2, 20_000)
        proc.join(60)
        assert proc.exitcode == 0
        assert sync.value(2) == 40_000 and sync.value(1) == 0
    finally:
        sync.close()


def bump(name: str, slot: int, n: int, ready: Any = None, go: Any = None) -> None:
    buffer = ShmSyncBuffer.open(name)
    if ready is not None:
        ready.set()
        go.wait(60)
    for _ in range(n):
        buffer.increment(slot)


# ---------------------------------------------------------------------------- the codec's pool route


def test_pool_route_finds_tensors_nested_in_batchfeature_and_keeps_types(pool: MmItemMemoryPool) -> None:
    from transformers import BatchFeature

    bf = BatchFeature({"pixel_values": torch.ones(2), "nested": {"t": (torch.zeros(1), [torch.ones(3)])}})
    payload = wrap_mm_inputs_for_ipc({"mm": bf, "ids": [1, 2]}, "cuda_ipc_pool", pool)
    assert pool.num_allocs == 3, "a tensor nested in the BatchFeature (a UserDict) was not routed"
    out: Any = unwrap_mm_inputs_from_ipc(payload)
    assert isinstance(out["mm"], BatchFeature) and out["ids"] == [1, 2]
    assert torch.equal(out["mm"]["pixel_values"], torch.ones(2))
    assert isinstance(out["mm"]["nested"]["t"], tuple) and isinstance(out["mm"]["nested"]["t"][1], list)
    assert torch.equal(out["mm"]["nested"]["t"][1][0], torch.ones(3))
    assert torch.equal(bf["pixel_values"], torch.ones(2)), "the input was modified"
    assert wait_until(lambda: pool.used_bytes == 0), "copied-out chunks were not acknowledged"


def consumer(payload: bytes, conn: Any) -> None:
    mm: Any = unwrap_mm_inputs_from_ipc(payload)
    conn.send({k: float(v.sum()) for k, v in mm.items()} | {"type": type(mm).__name__})
    close_opened_pools()


def test_pool_journey_across_processes(pool: MmItemMemoryPool) -> None:
    from transformers import BatchFeature

    pixels = torch.randn(3, 32, 32)
    bf = BatchFeature({"pixel_values": pixels, "features": torch.ones(100, 16)})
    payload = wrap_mm_inputs_for_ipc(bf, "cuda_ipc_pool", pool)
    assert pool.num_allocs == 2 and pool.used_bytes >= pixels.nbytes + 6400
    assert len(payload) < 4096, "the message carried tensor data instead of pool handles"
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=consumer, args=(payload, child))
    proc.start()
    try:
        assert parent.poll(60), "consumer did not answer"
        sums = parent.recv()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert sums["type"] == "BatchFeature"
    assert sums["pixel_values"] == pytest.approx(float(pixels.sum()), abs=1e-3)
    assert sums["features"] == 1600.0
    assert wait_until(lambda: pool.used_bytes == 0), "acked chunks were not recycled"


def test_wrap_falls_back_to_cpu_copy_when_pool_is_full(pool: MmItemMemoryPool) -> None:
    big = torch.ones(20 * 1024)  # 80 KiB > the 64 KiB pool
    payload = wrap_mm_inputs_for_ipc({"x": big}, "cuda_ipc_pool", pool)
    assert pool.num_full == 1 and pool.num_allocs == 0
    assert len(payload) > big.nbytes, "a full pool must send the data itself, not a handle"
    out: Any = unwrap_mm_inputs_from_ipc(payload)
    assert isinstance(out["x"], torch.Tensor) and torch.equal(out["x"], big)
    default: Any = unwrap_mm_inputs_from_ipc(wrap_mm_inputs_for_ipc({"x": big}, "default"))
    assert torch.equal(default["x"], big) and pool.num_allocs == 0, "default mode used the pool"
    with pytest.raises(ValueError, match="pool="):
        wrap_mm_inputs_for_ipc({"x": big}, "cuda_ipc_pool")
