"""No shared-memory segment outlives a deployment: clean stop, SIGKILL of either side, restart."""

from __future__ import annotations

import _posixshmem
import multiprocessing as mp
import os
import time
from typing import Any

import torch

from dpinfer.config import TransportConfig, ipc_address, new_deployment_id, shm_name
from dpinfer.transport import cleanup_stale_segments, make_receiver, make_sender
from dpinfer.transport.mm_pool import MmItemMemoryPool
from dpinfer.transport.shm import create_segment, list_segments, read_creator_pid

CTX = mp.get_context("spawn")
CFG = TransportConfig(transport="shm", shm_region_bytes=2 << 20, shm_wait_s=1.0)
BIG = 100_000  # floats: 400 KiB, over the inline limit


def receive_one(receiver: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        receiver.socket.poll(100)
        got = receiver.recv_ready()
        if got:
            return got[0]
    raise AssertionError("nothing arrived")


def receiver_child(address: str, dep: str, conn: Any) -> None:
    receiver = make_receiver(CFG, address, dep, 0)
    conn.send("ready")
    msg = receive_one(receiver)
    conn.send(float(msg["x"].sum()))
    time.sleep(600)  # holds the region until the test kills it


def sender_child(address: str, dep: str, conn: Any) -> None:
    # Owns segments of its own (a CPU pool) besides sending through the receiver's region.
    pool = MmItemMemoryPool.for_device(1 << 20, "cpu", dep, 0)
    sender = make_sender(CFG, address, dep, 0)
    sender.send({"x": torch.ones(BIG)})
    conn.send(pool.sync.name)
    time.sleep(600)


def kill(proc: Any) -> None:
    proc.kill()
    proc.join(30)
    assert proc.exitcode == -9


def test_sigkill_receiver_then_restart_then_sender_cleans_up() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "kill-recv")
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=receiver_child, args=(address, dep, parent))
    proc.start()
    sender = None
    try:
        assert child.poll(60) and child.recv() == "ready"
        sender = make_sender(CFG, address, dep, 0)
        sender.send({"x": torch.ones(BIG)})
        assert child.poll(30) and child.recv() == BIG
        region_pid = read_creator_pid(list_segments(dep)[0])
        assert region_pid == proc.pid
        kill(proc)
        assert len(list_segments(dep)) == 1, "the killed receiver's region is still there"
        # The next start with the same deployment id replaces the dead receiver's region...
        receiver = make_receiver(CFG, address, dep, 0)
        assert read_creator_pid(list_segments(dep)[0]) == os.getpid()
        # ...and the surviving sender moves over to it (and never unlinks the new one).
        sender.send({"x": torch.full((BIG,), 2.0)})
        assert float(receive_one(receiver)["x"].sum()) == 2 * BIG
        sender.close()
        assert len(list_segments(dep)) == 1
        receiver.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        if sender is not None:
            sender.close()
    assert list_segments(dep) == []


def test_sigkill_receiver_survivor_sender_unlinks_orphan() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "orphan")
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=receiver_child, args=(address, dep, parent))
    proc.start()
    try:
        assert child.poll(60) and child.recv() == "ready"
        sender = make_sender(CFG, address, dep, 0)
        sender.send({"x": torch.ones(BIG)})
        assert child.poll(30) and child.recv() == BIG
        kill(proc)
        sender.close()  # the survivor removes what the dead receiver left
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        # The killed receiver's ipc:// socket file (not shared memory, but ours to remove).
        socket_path = address.removeprefix("ipc://")
        if os.path.exists(socket_path):
            os.unlink(socket_path)
    assert list_segments(dep) == []


def test_sigkill_sender_survivor_receiver_cleans_up() -> None:
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "kill-send")
    receiver = make_receiver(CFG, address, dep, 0)
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=sender_child, args=(address, dep, parent))
    proc.start()
    try:
        assert float(receive_one(receiver, 60)["x"].sum()) == BIG
        assert child.poll(30)
        pool_sync = child.recv()
        assert pool_sync in list_segments(dep)
        kill(proc)
        assert len(list_segments(dep)) == 3  # region + the dead sender's pool and sync segments
        receiver.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert list_segments(dep) == []


def test_cleanup_removes_only_dead_owners() -> None:
    dep = new_deployment_id()
    proc = CTX.Process(target=os.getpid)
    proc.start()
    proc.join(60)
    dead_pid = proc.pid
    live = create_segment(shm_name(dep, 0, "live"), 4096)
    # Segments without our header: the pid in the name decides; no pid means "keep".
    foreign = [shm_name(dep, 0, f"foreign-p{dead_pid}"), shm_name(dep, 0, "nopid")]
    for name in foreign:
        os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_RDWR, mode=0o600))
    try:
        removed = cleanup_stale_segments(dep)
        assert removed == [foreign[0]]
        assert sorted(list_segments(dep)) == sorted([live.name, foreign[1]])
    finally:
        live.unlink()
        live.close()
        _posixshmem.shm_unlink("/" + foreign[1])
    assert list_segments(dep) == []
