"""``Injector``: one method per fault kind; each injects its fault and waits until it has resolved.

Resolved means: every rank is alive again (a killed rank by a new process, a frozen one
re-registered), the coordinator answers at its address, and a vanished client is gone. A fault
that does not resolve in time is reported (``recovered=False``) and ends the fault schedule.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from dpinfer import protocol as p
from dpinfer.chaos import proc
from dpinfer.chaos.cluster import Cluster, ClusterError
from dpinfer.chaos.monitor import Monitor
from dpinfer.chaos.plan import ChaosConfig, FaultKind, PlannedFault
from dpinfer.chaos.vanish import READY_LINE
from dpinfer.chaos.workload import FLOOD, ObservedClient, RequestSpec, Workload, run_one
from dpinfer.client.inputs import request_body
from dpinfer.errors import DpinferError
from dpinfer.log import get_logger
from dpinfer.procutil import die_with_parent
from dpinfer.sampling import SamplingParams

logger = get_logger(__name__)

RANK_RESTART_TIMEOUT_S = 180.0
"""A restarted rank imports torch and loads its model on a loaded machine: give it time."""
REREGISTER_TIMEOUT_S = 60.0
VANISH_REQUESTS = 4
VANISH_MAX_NEW_TOKENS = 1500
"""Long enough that a vanished client's requests would outlive the run unless they are aborted."""


@dataclass
class FaultOutcome:
    kind: str
    at_s: float
    """Seconds into the fault phase when it was injected."""
    target: str
    detail: str = ""
    recovered: bool = True
    recovery_s: float | None = None
    skipped: bool = False

    def as_map(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "at_s": round(self.at_s, 2), "target": self.target, "detail": self.detail,
            "recovered": self.recovered, "skipped": self.skipped,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
        }  # fmt: skip


class Injector:
    def __init__(
        self, cluster: Cluster, workload: Workload, monitor: Monitor, config: ChaosConfig, started_at: float
    ) -> None:
        self.cluster = cluster
        self.workload = workload
        self.monitor = monitor
        self.config = config
        self.started_at = started_at
        self.overloaded_expected = 0
        """Overloaded replies the floods must have caused at least (their excess over the client limit)."""
        self.vanished_clients = 0
        self.last_vanish_incarnation = 0

    async def inject(self, fault: PlannedFault) -> FaultOutcome:
        outcome = FaultOutcome(fault.kind.value, time.monotonic() - self.started_at, "")
        begun = time.monotonic()
        try:
            await self._INJECTORS[fault.kind](self, fault, outcome)
        except ClusterError as e:
            outcome.recovered = False
            outcome.detail = f"{outcome.detail}; did not recover: {e}".lstrip("; ")
        if outcome.recovered and not outcome.skipped:
            outcome.recovery_s = time.monotonic() - begun
        return outcome

    # ------------------------------------------------------------------ ranks

    async def _rank(self, rank: int) -> dict[str, Any] | None:
        status = await self.cluster.link.status(timeout_s=5.0)
        for entry in (status or {}).get("ranks", []):
            if entry.get("rank") == rank and entry.get("alive"):
                return entry
        return None

    async def _wait_replaced(self, rank: int, old_pid: int) -> None:
        def replaced(status: dict[str, Any]) -> bool:
            return any(r["rank"] == rank and r["alive"] and r["pid"] != old_pid for r in status["ranks"])

        await self.cluster.wait_ranks(RANK_RESTART_TIMEOUT_S, replaced)

    async def _kill_rank(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        victim = await self._rank(fault.rank)
        if victim is None:
            outcome.skipped, outcome.target = True, f"rank {fault.rank} (not alive)"
            return
        outcome.target = f"rank {fault.rank} main (pid {victim['pid']})"
        proc.send([victim["pid"]], signal.SIGKILL)
        await self._wait_replaced(fault.rank, victim["pid"])

    async def _kill_scheduler(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        victim = await self._rank(fault.rank)
        scheduler = None if victim is None else self.cluster.scheduler_pid(victim["pid"])
        if victim is None or scheduler is None:
            outcome.skipped, outcome.target = True, f"rank {fault.rank} scheduler (not found)"
            return
        outcome.target = f"rank {fault.rank} scheduler (pid {scheduler})"
        proc.send([scheduler], signal.SIGKILL)
        await self._wait_replaced(fault.rank, victim["pid"])

    async def _stop_rank(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        victim = await self._rank(fault.rank)
        if victim is None:
            outcome.skipped, outcome.target = True, f"rank {fault.rank} (not alive)"
            return
        pids = self.cluster.rank_tree(victim["pid"])
        outcome.target = f"rank {fault.rank} (pids {','.join(map(str, pids))})"
        frozen_at = time.monotonic()
        self.cluster.freeze(pids)
        try:
            declared_dead = await self._wait_declared_dead(fault.rank, self.config.heartbeat_timeout_s + 10.0)
        finally:
            self.cluster.thaw()
        frozen_s = time.monotonic() - frozen_at
        outcome.detail = f"frozen {frozen_s:.1f} s; " + (
            "declared dead" if declared_dead else "never declared dead (heartbeat timeout not enforced?)"
        )

        def back(status: dict[str, Any]) -> bool:
            return any(r["rank"] == fault.rank and r["alive"] for r in status["ranks"])

        await self.cluster.wait_ranks(REREGISTER_TIMEOUT_S, back)

    async def _wait_declared_dead(self, rank: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.cluster.link.status(timeout_s=2.0)
            ranks = {r["rank"]: r for r in (status or {}).get("ranks", [])}
            if rank in ranks and not ranks[rank]["alive"]:
                return True
            await asyncio.sleep(0.1)  # the hub's liveness sweep: poll its status with a deadline
        return False

    # ------------------------------------------------------------------ coordinator

    async def _kill_coordinator(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        assert self.cluster.coordinator is not None
        await self.monitor.poll()  # the old incarnation's counters, as late as possible
        outcome.target = f"coordinator (pid {self.cluster.coordinator.pid})"
        await self.cluster.kill_coordinator()
        self.cluster.start_coordinator()
        await self.cluster.wait_coordinator()
        await self.cluster.wait_ranks(REREGISTER_TIMEOUT_S)
        outcome.detail = f"restarted at {self.cluster.address} (pid {self.cluster.coordinator.pid})"

    # ------------------------------------------------------------------ clients

    async def _vanish_client(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        if fault.variant == "socket":
            outcome.target = "raw DEALER socket"
            await self._vanish_socket()
            outcome.detail = f"submitted {VANISH_REQUESTS} streamed requests, closed without reading"
        else:
            outcome.target = "client process"
            outcome.detail = await self._vanish_process()
        self.vanished_clients += 1
        self.last_vanish_incarnation = self.cluster.coordinator_starts

    async def _vanish_process(self) -> str:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpinfer.chaos.vanish", self.cluster.address,
            str(VANISH_REQUESTS), str(VANISH_MAX_NEW_TOKENS),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(signal.SIGKILL),
        )  # fmt: skip
        self.cluster.seen.add(child.pid)
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 60.0)
        except TimeoutError:
            line = b""
        child.kill()
        await child.wait()
        if line.decode().strip() != READY_LINE:
            return "it never streamed a token (killed anyway)"
        return f"SIGKILLed (pid {child.pid}) while streaming {VANISH_REQUESTS} requests"

    async def _vanish_socket(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.cluster.address)
            await sock.send_multipart(p.encode(p.ClientHello(p.PROTOCOL_VERSION, "chaos-vanishing-socket")))
            if await sock.poll(10_000):
                await sock.recv_multipart()  # the HelloAck; nothing after it is ever read
            params = SamplingParams(max_new_tokens=VANISH_MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
            entries = tuple(p.SubmitEntry(i + 1, p.NO_RANK, True) for i in range(VANISH_REQUESTS))
            bodies = tuple(request_body(f"vanishing socket {i}", params) for i in range(VANISH_REQUESTS))
            await sock.send_multipart(p.encode(p.Submit(entries, bodies)))
        finally:
            sock.close(linger=2000)  # the Submit goes out; then the socket is gone
            ctx.term()

    async def _flood(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        cfg = self.config
        per_client = cfg.max_client_requests + cfg.flood_excess
        outcome.target = f"{cfg.flood_clients} client(s) x {per_client} requests"
        clients = [ObservedClient(self.cluster.address, f"chaos-flood-{i}") for i in range(cfg.flood_clients)]
        records: list[Any] = []
        try:
            for client in clients:
                await client.start()
            spec = RequestSpec(FLOOD, "flood", 4)
            runs = [
                run_one(c, spec, False, cfg.deadline_s, records) for c in clients for _ in range(per_client)
            ]
            await asyncio.gather(*runs)  # every add lands in the same loop turn: one Submit per client
        except DpinferError as e:
            outcome.detail = f"flood client failed: {e}; "
        finally:
            for client in clients:
                await client.stop()
        self.workload.records.extend(records)
        self.overloaded_expected += cfg.flood_clients * cfg.flood_excess
        overloaded = sum(1 for r in records if r.error_code == p.ErrorCode.OVERLOADED.value)
        outcome.detail += f"{len(records)} submitted, {overloaded} answered overloaded"

    _INJECTORS: dict[FaultKind, Any] = {
        FaultKind.KILL_RANK: _kill_rank,
        FaultKind.STOP_RANK: _stop_rank,
        FaultKind.KILL_SCHEDULER: _kill_scheduler,
        FaultKind.KILL_COORDINATOR: _kill_coordinator,
        FaultKind.VANISH_CLIENT: _vanish_client,
        FaultKind.FLOOD: _flood,
    }
