"""The deployment a chaos run attacks: a coordinator process of its own plus ``torchrun``.

``dpinfer serve`` runs its coordinator as a child it cannot restart at the same address; here
it is ``dpinfer coordinator --port P`` in a process of its own, so a fault can SIGKILL it and
start it again on P. The ranks are launched exactly as ``serve`` launches them
(``Deployment.torchrun_command``). Every process ever seen below the two is remembered, so
``leftovers()`` can say what outlived the shutdown and ``force_cleanup()`` can end it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dpinfer.chaos import proc
from dpinfer.chaos.link import StatusLink
from dpinfer.config import SHM_PREFIX, CoordinatorConfig, new_deployment_id
from dpinfer.errors import DpinferError
from dpinfer.launcher.deployment import Deployment, ServeConfig
from dpinfer.log import get_logger
from dpinfer.procutil import die_with_parent

logger = get_logger(__name__)

SCHEDULER_COMM = "dpinfer-sched"
SHM_DIR = Path("/dev/shm")


StatusTest = Callable[[dict[str, Any]], bool]


def live_ranks(status: dict[str, Any]) -> dict[int, int]:
    """Rank id -> pid of every rank the status calls alive."""
    return {r["rank"]: r["pid"] for r in status.get("ranks", []) if r.get("alive")}


class ClusterError(DpinferError):
    """The deployment under test could not start or recover in time."""


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "tiny-llama"
    dp: int = 2
    max_restarts: int = 1
    heartbeat_interval_s: float = 0.25
    heartbeat_timeout_s: float = 1.5
    max_queued_requests: int = 64
    max_client_requests: int = 24
    client_timeout_s: float = 5.0
    """Passed on only when this coordinator has ``--client-timeout-s``."""
    kv_cache_bytes: int = 64 << 20
    threads_per_rank: int = 1
    ready_timeout_s: float = 240.0
    deployment_id: str = field(default_factory=new_deployment_id)
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="dpinfer-chaos-"))


def coordinator_options() -> set[str]:
    """The option names (``--x``) this build's ``dpinfer coordinator`` takes."""
    from dpinfer.coordinator.commands import coordinator

    return {opt for param in coordinator.params for opt in param.opts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_us() -> None:
    os.setsid()  # Ctrl-C in the terminal reaches the harness only; it stops the rest in order
    die_with_parent(signal.SIGTERM)  # a harness killed outright still takes its deployment along


class Cluster:
    """Start, attack, restart and stop one deployment; remember every process it had."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.torchrun: subprocess.Popen[bytes] | None = None
        self.coordinator_starts = 0
        self.seen: set[int] = set()
        self.stopped_pids: set[int] = set()
        """Processes a fault has SIGSTOPped and not yet continued (continued before any kill)."""
        self.link = StatusLink(self.address)
        self.unsupported: list[str] = []
        """Coordinator options the harness wanted but this build lacks."""
        self._logs: list[IO[bytes]] = []
        self._coordinator_args = self._coordinator_command_tail()

    # ------------------------------------------------------------------ start

    def _coordinator_command_tail(self) -> list[str]:
        cfg = self.config
        args = [
            "--host", "127.0.0.1", "--port", str(self.port),
            "--heartbeat-interval-s", str(cfg.heartbeat_interval_s),
            "--heartbeat-timeout-s", str(cfg.heartbeat_timeout_s),
            "--control-timeout-s", "20",
            "--max-queued-requests", str(cfg.max_queued_requests),
            "--max-client-requests", str(cfg.max_client_requests),
        ]  # fmt: skip
        if "--client-timeout-s" in coordinator_options():
            args += ["--client-timeout-s", str(cfg.client_timeout_s)]
        else:
            self.unsupported.append("--client-timeout-s")
        return args

    def _log(self, name: str) -> IO[bytes]:
        log = open(Path(self.config.log_dir, name), "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return log

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self._log(log_name)
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, preexec_fn=_die_with_us)
        self.seen.add(child.pid)
        return child

    def start_coordinator(self) -> None:
        self.coordinator_starts += 1
        cmd = [sys.executable, "-m", "dpinfer", "coordinator", *self._coordinator_args]
        self.coordinator = self._spawn(cmd, "coordinator.log")

    def torchrun_command(self) -> list[str]:
        cfg = self.config
        serve = ServeConfig(
            dp=cfg.dp,
            coordinator=CoordinatorConfig(port=self.port),
            engine_args=(
                *("--model", cfg.model, "--device", "cpu", "--deployment-id", cfg.deployment_id),
                *("--kv-cache-bytes", str(cfg.kv_cache_bytes)),
            ),
            max_restarts=cfg.max_restarts,
            threads_per_rank=cfg.threads_per_rank,
            deployment_id=cfg.deployment_id,
        )
        deployment = Deployment(serve)
        deployment.address = self.address
        return deployment.torchrun_command()

    async def start(self) -> None:
        self.start_coordinator()
        await self.wait_coordinator()
        self.torchrun = self._spawn(self.torchrun_command(), "ranks.log")
        await self.wait_ranks(self.config.ready_timeout_s)

    async def wait_coordinator(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.coordinator is not None
            if self.coordinator.poll() is not None:
                raise ClusterError(
                    f"the coordinator exited with code {self.coordinator.returncode}; "
                    f"see {self.config.log_dir}/coordinator.log"
                )
            if await self.link.status(timeout_s=2.0) is not None:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"the coordinator did not answer at {self.address} in {timeout_s:g} s")

    async def wait_ranks(self, timeout_s: float) -> dict[str, Any]:
        """Wait until every rank is alive; the last status."""
        return await self.wait_for(timeout_s, lambda status: len(live_ranks(status)) >= self.config.dp,
                                   f"all {self.config.dp} rank(s) alive")  # fmt: skip

    async def wait_for(self, timeout_s: float, until: StatusTest, what: str) -> dict[str, Any]:
        """Wait until ``until(status)`` holds; the last status. ``ClusterError`` after ``timeout_s``,
        or at once if torchrun (every rank) is gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.link.status(timeout_s=2.0)
            if status is not None and until(status):
                return status
            if self.torchrun is not None and self.torchrun.poll() is not None:
                raise ClusterError(
                    f"torchrun exited with code {self.torchrun.returncode}; "
                    f"see {self.config.log_dir}/ranks.log"
                )
            if time.monotonic() > deadline:
                ranks = [
                    (r.get("rank"), r.get("pid"), r.get("alive")) for r in (status or {}).get("ranks", [])
                ]
                raise ClusterError(f"not {what} after {timeout_s:g} s (ranks: (id, pid, alive) {ranks})")
            await asyncio.sleep(0.2)  # ranks load a model: a cheap status poll with a deadline

    # ------------------------------------------------------------------ what runs

    def remember(self) -> dict[int, list[int]]:
        """Add every process now below the coordinator and torchrun to ``seen``."""
        children = proc.children_map()
        for root in (self.coordinator, self.torchrun):
            if root is not None:
                self.seen |= proc.descendants(root.pid, children)
        return children

    def rank_tree(self, rank_pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
        """A rank main and its children (tokenizer, scheduler, detokenizer)."""
        return [rank_pid, *sorted(proc.descendants(rank_pid, children))]

    def scheduler_pid(self, rank_pid: int) -> int | None:
        for pid in proc.descendants(rank_pid):
            if proc.comm(pid) == SCHEDULER_COMM:
                return pid
        return None

    # ------------------------------------------------------------------ faults

    def freeze(self, pids: list[int]) -> None:
        self.stopped_pids |= set(proc.send(pids, signal.SIGSTOP))

    def thaw(self) -> None:
        proc.send(sorted(self.stopped_pids, reverse=True), signal.SIGCONT)
        self.stopped_pids.clear()

    async def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.kill()
        await asyncio.to_thread(self.coordinator.wait)

    # ------------------------------------------------------------------ stop

    async def stop(self, deadline_s: float = 10.0) -> None:
        """Stop as ``serve`` does: STOP the ranks through the coordinator, wait for torchrun,
        then SIGTERM the coordinator. Whatever does not go in time is left for ``leftovers``."""
        self.thaw()
        self.remember()
        if self.torchrun is not None and self.torchrun.poll() is None:
            if not await self.link.stop_engines(deadline_s):
                proc.send([self.torchrun.pid], signal.SIGTERM)
            if not await _wait(self.torchrun, deadline_s + 30.0):
                proc.send([self.torchrun.pid], signal.SIGTERM)
                await _wait(self.torchrun, 15.0)
        await self.link.close()
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            await _wait(self.coordinator, 10.0)

    def leftovers(self) -> dict[str, list[str]]:
        """Processes, shared-memory segments and ipc socket files of this deployment still there."""
        files = self._files()
        return {
            "processes": [f"{pid} ({proc.comm(pid)})" for pid in sorted(self.seen) if proc.alive(pid)],
            "shm": sorted(name for directory, name in files if directory == SHM_DIR),
            "ipc": sorted(name for directory, name in files if directory != SHM_DIR),
        }

    def _files(self) -> list[tuple[Path, str]]:
        """(directory, name) of every shared-memory segment and ipc file named for this deployment."""
        prefix = f"{SHM_PREFIX}-{self.config.deployment_id}-"
        ipc_dir = Path(os.environ.get("DPINFER_IPC_DIR", tempfile.gettempdir()))
        return [(d, n) for d in (SHM_DIR, ipc_dir) for n in _listdir(d) if n.startswith(prefix)]

    def force_cleanup(self) -> None:
        """End everything still there (whatever state the run is in); idempotent."""
        self.thaw()
        for root in (self.coordinator, self.torchrun):
            if root is not None and root.poll() is None:
                self.seen |= proc.descendants(root.pid)
        proc.send(sorted(p for p in self.seen if proc.alive(p)), signal.SIGKILL)
        for root in (self.coordinator, self.torchrun):
            if root is not None:
                if root.poll() is None:
                    root.kill()
                root.wait()
        for directory, name in self._files():
            Path(directory, name).unlink(missing_ok=True)
        for log in self._logs:
            log.close()
        self._logs.clear()


async def _wait(child: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        await asyncio.to_thread(child.wait, timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
