"""The shared-memory region: allocation, recycling, concurrent senders, backpressure."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import torch

from dpinfer.config import TransportConfig, ipc_address, new_deployment_id, shm_name
from dpinfer.transport import make_receiver, make_sender
from dpinfer.transport.shm import list_segments
from dpinfer.transport.shm_region import ShmRegion

CTX = mp.get_context("spawn")
DEADLINE_S = 60.0


@pytest.fixture
def region() -> Any:
    r = ShmRegion.create(shm_name(new_deployment_id(), 0, "unit"), 64 * 4096, max_tickets=8)
    yield r
    r.close()


def test_region_best_fit_out_of_order_release_and_coalescing(region: ShmRegion) -> None:
    assert region.page_bytes == 4096 and region.num_pages == 64
    a = region.alloc(10 * 4096, 0)
    b = region.alloc(4096 + 1, 0)  # rounds up to 2 pages
    c = region.alloc(20 * 4096, 0)
    assert a and b and c
    assert [a[1], b[1], c[1]] == [0, 10 * 4096, 12 * 4096]
    region.release(a[0])  # holes: 10 pages at 0, 32 pages at the end
    d = region.alloc(8 * 4096, 0)  # best fit: the 10-page hole, not the 32-page tail
    assert d and d[1] == 0
    region.release(b[0])
    region.release(d[0])
    # The freed 8 + 2 + 2 pages at the front coalesce into one 12-page run.
    e = region.alloc(12 * 4096, 0)
    assert e and e[1] == 0
    assert region.alloc(33 * 4096, 0) is None  # the tail holds only 32 pages
    assert region.used_pages() == 32


def test_region_bounded_by_tickets_and_capacity(region: ShmRegion) -> None:
    slots = [region.alloc(100, 0) for _ in range(8)]
    assert all(slots)
    t0 = time.monotonic()
    assert region.alloc(100, 0.05) is None  # no free ticket: waits, bounded
    assert 0.05 <= time.monotonic() - t0 < 2.0
    assert region.alloc(65 * 4096, 10.0) is None  # can never fit: no wait at all
    region.release(slots[3][0])
    assert region.alloc(100, 0) is not None


def test_region_view_releases_slot_when_last_reference_dies(region: ShmRegion) -> None:
    src = torch.arange(5000, dtype=torch.float32).reshape(50, 100)
    ticket, offset = region.alloc(src.numel() * 4, 0)
    handle = region.write(ticket, offset, src.t())  # non-contiguous source
    view = region.view(handle)
    part = view[3:7]
    assert torch.equal(view, src.t())
    del view
    assert region.tickets_in_use() == 1, "a derived view still holds the slot"
    del part
    assert region.tickets_in_use() == 0


def sender_process(cfg: TransportConfig, address: str, dep: str, worker: int, n: int, conn: Any) -> None:
    sender = make_sender(cfg, address, dep, 0)
    threads = [threading.Thread(target=send_many, args=(sender, worker * 10 + t, n)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send(sender.stats())
    sender.close()


def send_many(sender: Any, source: int, n: int) -> None:
    for i in range(n):
        g = torch.Generator().manual_seed(source * 1000 + i)
        numel = int(torch.randint(70_000, 150_000, (1,), generator=g))  # 280-600 KiB
        data = torch.randn(numel, generator=g)
        sender.send({"source": source, "seq": i, "data": data, "checksum": float(data.double().sum())})


def test_concurrent_threads_and_processes_into_one_region() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "many")
    cfg = TransportConfig(transport="shm", shm_region_bytes=3 << 20, shm_wait_s=30.0)
    receiver = make_receiver(cfg, address, dep, 0)
    local_sender = make_sender(cfg, address, dep, 0)
    pipes, procs = [], []
    try:
        for worker in range(2):
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=sender_process, args=(cfg, address, dep, worker, 8, child))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        local = threading.Thread(target=send_many, args=(local_sender, 99, 8))
        local.start()
        seen: dict[int, list[int]] = {}
        deadline = time.monotonic() + DEADLINE_S
        while sum(map(len, seen.values())) < 5 * 8 and time.monotonic() < deadline:
            receiver.socket.poll(100)
            for msg in receiver.recv_ready():
                assert float(msg["data"].double().sum()) == pytest.approx(msg["checksum"], abs=1e-6)
                seen.setdefault(msg["source"], []).append(msg["seq"])
                del msg  # frees the slot for the next sender
        local.join(DEADLINE_S)
        stats = [p.recv() for p in pipes if p.poll(DEADLINE_S)]
        for proc in procs:
            proc.join(DEADLINE_S)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        local_sender.close()
        receiver.close()
    assert sorted(seen) == [0, 1, 10, 11, 99]
    assert all(seqs == list(range(8)) for seqs in seen.values()), "per-thread order was not kept"
    assert len(stats) == 2 and all(s["num_routed"] == 16 and s["num_fallbacks"] == 0 for s in stats)
    assert receiver.num_dropped == 0
    assert list_segments(dep) == []


def test_full_region_waits_bounded_then_falls_back_inline() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "full")
    cfg = TransportConfig(transport="shm", shm_region_bytes=1 << 20, shm_wait_s=1.0)
    receiver = make_receiver(cfg, address, dep, 0)
    sender = make_sender(cfg, address, dep, 0)
    try:
        chunk = torch.full((96 * 1024,), 7.0)  # 384 KiB: two fit in 1 MiB, the third does not
        held: list[Any] = []

        def exchange() -> Any:
            sender.send({"x": chunk})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                receiver.socket.poll(100)
                got = receiver.recv_ready()
                if got:
                    return got[0]["x"]
            raise AssertionError("nothing arrived")

        held += [exchange(), exchange()]  # the receiver keeps both views: region is full
        t0 = time.monotonic()
        inline = exchange()
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 10.0, waited
        assert sender.stats()["num_fallbacks"] == 1 and torch.equal(inline, chunk)
        t0 = time.monotonic()
        assert torch.equal(exchange(), chunk)  # still full: no second stall
        assert time.monotonic() - t0 < 0.9 and sender.stats()["num_fallbacks"] == 2
        held.clear()  # views dropped -> slots released -> the next send is out of band again
        assert torch.equal(exchange(), chunk)
        assert sender.stats()["num_routed"] == 3
    finally:
        sender.close()
        receiver.close()
    assert list_segments(dep) == []
