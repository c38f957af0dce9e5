"""Several machines, the torchrun way: two launches on loopback as two nodes (``--nnodes 2``,
c10d rendezvous). Ranks from both register and serve; SIGKILL of one launch leaves the other
node's rank serving, every request ending exactly once (issue 9, item 9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import alive, descendants
from wire import WireClient, live_ranks

START_TIMEOUT_S = 180.0
MAX_TOKENS = {"max_new_tokens": 24, "temperature": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(node: int, coordinator: str, rdzv_port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{rdzv_port}",
        "--rdzv_id", f"dpinfer-{rdzv_port}",
        "--rdzv_conf", f"is_host={1 if node == 0 else 0}", "--max-restarts", "0",
        "--module", "dpinfer.launcher.worker", "--coordinator", coordinator, "--model", "tiny-llama",
        "--device", "cpu", "--threads-per-rank", "1", "--kv-cache-bytes", str(32 << 20),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", DPINFER_IPC_DIR=str(log.parent))
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def two_nodes(
    tmp_path: Path, coordinator_factory
) -> Iterator[tuple[WireClient, list[subprocess.Popen[bytes]]]]:
    handle = coordinator_factory(heartbeat_timeout_s=2.0)
    port = free_port()
    launches = [launch(node, handle.address, port, tmp_path / f"node{node}.log") for node in (0, 1)]
    client = WireClient(handle.address, name="multi-node")
    started: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while live_ranks(client.status()) != {0, 1}:
            for node, proc in enumerate(launches):
                started |= descendants(proc.pid)
                log = (tmp_path / f"node{node}.log").read_text(errors="replace")
                assert proc.poll() is None, f"node {node} launch exited:\n{log[-3000:]}"
            assert time.monotonic() < deadline, "both nodes' ranks did not register in time"
            client.pump(0.5)
        for proc in launches:
            started |= descendants(proc.pid)
        yield client, launches
    finally:
        client.close()
        for proc in launches:
            started |= descendants(proc.pid)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in launches:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in started if alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the launches left behind: {left}"


def test_two_nodes_serve_and_one_survives_the_other(two_nodes) -> None:
    client, launches = two_nodes
    first = client.wait_results(
        client.submit([f"p{i}" for i in range(8)], sampling=MAX_TOKENS), timeout_s=120
    )
    assert {r.rank for r in first} == {0, 1}, "ranks of both nodes serve"
    assert all(r.num_finals == 1 and r.final.finish_reason in ("stop", "length") for r in first)
    # Kill node 1's whole launch while requests run on both nodes.
    during = client.submit([f"q{i}" for i in range(8)], sampling=MAX_TOKENS)
    node1 = launches[1]
    for pid in descendants(node1.pid) | {node1.pid}:
        os.kill(pid, signal.SIGKILL)
    ended = client.wait_results(during, timeout_s=120)
    assert all(r.num_finals == 1 for r in ended), "every request ends exactly once"
    client.wait_ranks(lambda s: live_ranks(s) == {0}, timeout_s=30, what="node 1's rank to be gone")
    after = client.wait_results(
        client.submit([f"r{i}" for i in range(4)], sampling=MAX_TOKENS), timeout_s=120
    )
    assert all(r.rank == 0 and r.final.finish_reason in ("stop", "length") for r in after)
    assert launches[0].poll() is None, "node 0's launch keeps running"
