"""Supervisor: ready handshakes, start failures with their reason, timeouts, no orphans."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from procs import alive

from dpinfer.config import ConfigError, RankConfig
from dpinfer.rank.children import CHILDREN
from dpinfer.rank.supervisor import ChildStartError, Supervisor

HERE = "test_rank_supervisor"
DEADLINE_S = 15.0


# ---------------------------------------------------------------------------- child targets


def child(name: str, function: str) -> Any:
    """The product's spec of child ``name``, running ``function`` of this module instead."""
    spec = next(s for s in CHILDREN if s.name == name)
    return dataclasses.replace(spec, target=f"{HERE}:{function}")


def ready_then_wait(config: RankConfig, report_ready: Any) -> None:
    report_ready({"rank": config.rank, "pid": os.getpid()})
    threading.Event().wait()


def fail_with_config_error(config: RankConfig, report_ready: Any) -> None:
    raise ConfigError("--model: 'x' is unknown; valid: tiny-llama")


def exit_silently(config: RankConfig, report_ready: Any) -> None:
    os._exit(3)


def never_ready(config: RankConfig, report_ready: Any) -> None:
    threading.Event().wait()


def supervising_parent(conn: Any) -> None:
    """A stand-in rank main: starts two children, reports their pids, then waits to be killed."""
    sup = Supervisor(RankConfig())
    sup.start([child("tokenizer", "ready_then_wait"), child("detokenizer", "ready_then_wait")])
    sup.wait_ready(DEADLINE_S)
    conn.send(sup.pids())
    threading.Event().wait()


# ---------------------------------------------------------------------------- helpers


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        threading.Event().wait(0.02)


@pytest.fixture
def sup() -> Any:
    supervisor = Supervisor(RankConfig(rank=2))
    yield supervisor
    supervisor.stop(timeout_s=0.2)


# ---------------------------------------------------------------------------- tests


def test_ready_handshake_names_and_stop(sup: Supervisor) -> None:
    sup.start([child("tokenizer", "ready_then_wait"), child("scheduler", "ready_then_wait")])
    infos = sup.wait_ready(DEADLINE_S)
    pids = sup.pids()
    assert infos == {name: {"rank": 2, "pid": pids[name]} for name in ("tokenizer", "scheduler")}
    assert Path(f"/proc/{pids['tokenizer']}/comm").read_text().strip() == "dpinfer-tok"
    assert Path(f"/proc/{pids['scheduler']}/comm").read_text().strip() == "dpinfer-sched"
    assert len(sup.sentinels()) == 2
    sup.stop(timeout_s=0.2)  # they never exit on their own: terminated
    wait_gone(list(pids.values()))


def test_start_failure_carries_the_childs_reason(sup: Supervisor) -> None:
    sup.start([child("scheduler", "fail_with_config_error"), child("tokenizer", "ready_then_wait")])
    with pytest.raises(ChildStartError, match=r"scheduler process failed to start: --model: 'x' is unknown"):
        sup.wait_ready(DEADLINE_S)


def test_child_that_exits_before_ready(sup: Supervisor) -> None:
    sup.start([child("detokenizer", "exit_silently")])
    with pytest.raises(ChildStartError, match=r"detokenizer process \(pid \d+\) exited with code 3 before"):
        sup.wait_ready(DEADLINE_S)


def test_bad_target_and_timeout(sup: Supervisor) -> None:
    sup.start([child("tokenizer", "no_such_function")])
    with pytest.raises(ChildStartError, match="AttributeError"):
        sup.wait_ready(DEADLINE_S)
    slow = Supervisor(RankConfig())
    slow.start([child("scheduler", "never_ready")])
    t0 = time.monotonic()
    try:
        with pytest.raises(ChildStartError, match=r"scheduler not ready within 0.5 s \(--ready-timeout-s\)"):
            slow.wait_ready(0.5)
        assert time.monotonic() - t0 < 5.0
    finally:
        slow.stop(timeout_s=0.1)


def test_children_die_with_a_killed_rank_main() -> None:
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    parent = ctx.Process(target=supervising_parent, args=(writer,))  # not daemonic: it has children
    parent.start()
    try:
        assert reader.poll(DEADLINE_S * 2), "the stand-in rank main did not start its children"
        pids = list(reader.recv().values())
        assert all(alive(p) for p in pids)
        assert parent.pid is not None
        os.kill(parent.pid, signal.SIGKILL)
        wait_gone(pids)  # PR_SET_PDEATHSIG: each child gets SIGTERM when the parent dies
    finally:
        if parent.is_alive():
            parent.kill()
        parent.join(5)
