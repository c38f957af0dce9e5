"""Engine rank failures end to end: a child that cannot start, a child killed while serving."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_engine_e2e import (
    CHILD_COMMS,
    GREEDY,
    child_pids,
    pid_alive,
    short_tmpdir,
    start_rank,
    submit_bodies,
    wait_rank_live,
)
from wire import WireClient

from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.process import CoordinatorHandle, start_coordinator
from dpinfer.transport.shm import list_segments


def processes_started_under(workdir: Path) -> list[int]:
    """Live processes whose environment names ``workdir`` (everything a test rank started)."""
    marker = f"DPINFER_IPC_DIR={workdir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def coordinator() -> Iterator[CoordinatorHandle]:
    handle = start_coordinator(CoordinatorConfig(port=0, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0))
    yield handle
    handle.stop(timeout_s=5)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_bad_model_is_reported_and_the_rank_exits(coordinator: CoordinatorHandle, workdir: Path) -> None:
    rank = start_rank(coordinator.address, workdir, 0, "no-such-model")
    try:
        code = rank.proc.wait(timeout=120)
    finally:
        rank.kill()
    log = rank.log()
    assert code == 1, log
    assert "cannot start" in log and "'no-such-model'" in log and "tiny-llama" in log, log
    assert "Traceback" not in log, "a user error is reported without a traceback"
    deadline = time.monotonic() + 10
    while processes_started_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)  # reaping by init is asynchronous; nothing to wait on
    assert not processes_started_under(workdir), "processes left behind"


def test_killed_child_hands_its_requests_back_and_the_rank_exits(
    coordinator: CoordinatorHandle, workdir: Path
) -> None:
    rank = start_rank(coordinator.address, workdir, 1)
    client = WireClient(coordinator.address)
    try:
        wait_rank_live(client, rank, rank_id=1)
        children = child_pids(rank.proc.pid)
        assert set(children) == set(CHILD_COMMS), children
        body = {"prompt": "doomed", "sampling": {"max_new_tokens": 1900, "ignore_eos": True, **GREEDY}}
        (rid,) = submit_bodies(client, [body], stream=True)
        client.wait_for(
            lambda: bool(client.results.get(rid) and client.results[rid].partials), 60, "a partial"
        )
        os.kill(children["dpinfer-detok"], signal.SIGKILL)
        assert rank.proc.wait(timeout=30) == 1, rank.log()
        assert "the detokenizer process" in rank.log() and "died unexpectedly" in rank.log()
        # The rank handed the request back: it migrates, and with no other rank it waits in
        # the hub for one (no error, no final yet); aborting it ends it exactly once.
        status = client.wait_ranks(lambda s: s["counters"]["migrated"] == 1, 10, "the hand-back")
        assert status["totals"]["pending"] == 1 and status["totals"]["in_flight"] == 1
        assert client.results[rid].final is None
        client.abort([rid])
        (res,) = client.wait_results([rid], 10)
        assert res.final.finish_reason == "abort" and res.num_finals == 1
        client.wait_ranks(
            lambda s: not any(r["rank"] == 1 and r["alive"] for r in s["ranks"]), 10, "rank 1 gone"
        )
        deadline = time.monotonic() + 15
        while processes_started_under(workdir) and time.monotonic() < deadline:
            client.pump(0.1)
        assert not processes_started_under(workdir), "processes left behind"
    finally:
        client.close()
        rank.kill()


@pytest.mark.parametrize("attempt", range(2))
def test_children_of_a_killed_rank_main_exit(
    coordinator: CoordinatorHandle, workdir: Path, attempt: int
) -> None:
    # Regression: the SIGTERM that PR_SET_PDEATHSIG sends when the rank main dies used to be
    # lost about one time in three (the child sat in a ZMQ call and the handler's SystemExit
    # never surfaced), so children lived on forever. Repeated because it was a race.
    from dpinfer.rank.supervisor import EXIT_GRACE_S

    rank = start_rank(coordinator.address, workdir, 2 + attempt)
    client = WireClient(coordinator.address)
    children: dict[str, int] = {}
    try:
        wait_rank_live(client, rank, rank_id=2 + attempt)
        children = child_pids(rank.proc.pid)
        assert set(children) == set(CHILD_COMMS), children
        rank.proc.kill()
        rank.proc.wait(timeout=10)
        deadline = time.monotonic() + EXIT_GRACE_S + 10
        while any(pid_alive(p) for p in children.values()) and time.monotonic() < deadline:
            client.pump(0.1)
        left = {name: pid for name, pid in children.items() if pid_alive(pid)}
        assert not left, f"children outlived their killed rank main: {left}"
    finally:
        client.close()
        rank.kill()
        for pid in children.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_scheduler_leaves_no_shared_memory_behind(
    coordinator: CoordinatorHandle, workdir: Path
) -> None:
    """A rank started without `dpinfer serve`, on the shm transport, whose scheduler is SIGKILLed."""
    before = set(list_segments())
    rank = start_rank(coordinator.address, workdir, 2, "tiny-llama", "--transport", "shm")
    client = WireClient(coordinator.address)
    try:
        wait_rank_live(client, rank, rank_id=2)
        mine = set(list_segments()) - before
        assert mine, "the shm transport holds a region while serving"
        os.kill(child_pids(rank.proc.pid)["dpinfer-sched"], signal.SIGKILL)
        assert rank.proc.wait(timeout=30) == 1, rank.log()
        assert not (set(list_segments()) & mine), "the dead scheduler's region was removed"
    finally:
        client.close()
        rank.kill()
