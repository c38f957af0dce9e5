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
from dpinfer.chaos.cluster import Cluster, ClusterError, StatusTest, live_ranks
from dpinfer.chaos.monitor import Monitor
from dpinfer.chaos.plan import RESTARTING_KINDS, ChaosConfig, FaultKind, PlannedFault
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
    pending: bool = False
    """Its recovery (a rank restart) is awaited in the background; ``recovery_s`` is set then."""
    begun: float = 0.0

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
        self.vanished: list[bool] = []
        """Per vanished client: whether the hub forgot it within the client timeout (+5 s)."""
        self._pending: list[asyncio.Task[None]] = []

    async def inject(self, fault: PlannedFault) -> FaultOutcome:
        if fault.kind in RESTARTING_KINDS:
            await self.settle()  # one rank restart at a time: never every rank down at once
        outcome = FaultOutcome(fault.kind.value, time.monotonic() - self.started_at, "")
        begun = outcome.begun = time.monotonic()
        try:
            await self._INJECTORS[fault.kind](self, fault, outcome)
        except ClusterError as e:
            outcome.recovered = False
            outcome.detail = f"{outcome.detail}; did not recover: {e}".lstrip("; ")
        if outcome.recovered and not outcome.skipped and not outcome.pending:
            outcome.recovery_s = time.monotonic() - begun
        return outcome

    async def settle(self) -> None:
        """Wait until every rank restart a fault caused is over (each bounded by its own timeout)."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)

    @property
    def restarting(self) -> bool:
        """Whether a rank a fault ended is still coming back."""
        return any(not task.done() for task in self._pending)

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()

    def _recover_later(self, outcome: FaultOutcome, until: StatusTest, what: str) -> None:
        """A restart takes a model load: let the schedule go on while it happens."""

        async def recover() -> None:
            try:
                await self.cluster.wait_for(RANK_RESTART_TIMEOUT_S, until, what)
                outcome.recovery_s = time.monotonic() - outcome.begun
            except ClusterError as e:
                outcome.recovered = False
                outcome.detail = f"{outcome.detail}; did not recover: {e}".lstrip("; ")

        outcome.pending = True
        self._pending.append(asyncio.create_task(recover()))

    # ------------------------------------------------------------------ ranks

    async def _victim(self, rank: int, outcome: FaultOutcome) -> tuple[int, int] | None:
        """(rank, pid) of the planned rank, or of another live one if it is restarting; None if none."""
        status = await self.cluster.link.status(timeout_s=5.0)
        live = live_ranks(status or {})
        if rank in live:
            return rank, live[rank]
        if not live:
            outcome.skipped, outcome.target = True, f"rank {rank} (no rank alive)"
            return None
        other = min(live)
        outcome.detail = f"rank {rank} not alive, took rank {other}; "
        return other, live[other]

    async def _kill_and_restart(self, rank: int, rank_pid: int, victim: int, outcome: FaultOutcome) -> None:
        proc.send([victim], signal.SIGKILL)
        timeout_s = self.config.heartbeat_timeout_s + 10.0
        await self.cluster.wait_for(
            timeout_s, lambda st: live_ranks(st).get(rank) != rank_pid, f"rank {rank}'s death noticed"
        )
        outcome.detail += "death noticed; restarting"
        self._recover_later(
            outcome, lambda st: live_ranks(st).get(rank, rank_pid) != rank_pid, f"rank {rank} restarted"
        )

    async def _kill_rank(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        found = await self._victim(fault.rank, outcome)
        if found is None:
            return
        rank, pid = found
        outcome.target = f"rank {rank} main (pid {pid})"
        await self._kill_and_restart(rank, pid, pid, outcome)

    async def _kill_scheduler(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        found = await self._victim(fault.rank, outcome)
        scheduler = None if found is None else self.cluster.scheduler_pid(found[1])
        if found is None or scheduler is None:
            outcome.skipped, outcome.target = True, f"rank {fault.rank} scheduler (not found)"
            return
        rank, pid = found
        outcome.target = f"rank {rank} scheduler (pid {scheduler})"
        await self._kill_and_restart(rank, pid, scheduler, outcome)

    async def _stop_rank(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        found = await self._victim(fault.rank, outcome)
        if found is None:
            return
        rank, pid = found
        pids = self.cluster.rank_tree(pid)
        outcome.target = f"rank {rank} (pids {','.join(map(str, pids))})"
        frozen_at = time.monotonic()
        self.cluster.freeze(pids)
        try:
            declared_dead = await self._wait_declared_dead(rank, self.config.heartbeat_timeout_s + 10.0)
        finally:
            self.cluster.thaw()
        outcome.detail += f"frozen {time.monotonic() - frozen_at:.1f} s, " + (
            "declared dead" if declared_dead else "never declared dead (heartbeat timeout not enforced?)"
        )
        await self.cluster.wait_for(
            REREGISTER_TIMEOUT_S, lambda st: rank in live_ranks(st), f"rank {rank} back"
        )

    async def _wait_declared_dead(self, rank: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.cluster.link.status(timeout_s=2.0)
            if status is not None and rank not in live_ranks(status):
                return True
            await asyncio.sleep(0.1)  # the hub's liveness sweep: poll its status with a deadline
        return False

    # ------------------------------------------------------------------ coordinator

    async def _kill_coordinator(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        assert self.cluster.coordinator is not None
        await self.monitor.poll()  # the old incarnation's counters, as late as possible
        before = set(live_ranks(self.monitor.last_status or {}))
        outcome.target = f"coordinator (pid {self.cluster.coordinator.pid})"
        await self.cluster.kill_coordinator()
        self.cluster.start_coordinator()
        await self.cluster.wait_coordinator()
        await self.cluster.wait_for(
            REREGISTER_TIMEOUT_S,
            lambda st: before <= set(live_ranks(st)),
            f"ranks {sorted(before)} re-registered",
        )
        outcome.detail = f"restarted at {self.cluster.address} (pid {self.cluster.coordinator.pid})"

    # ------------------------------------------------------------------ clients

    async def _vanish_client(self, fault: PlannedFault, outcome: FaultOutcome) -> None:
        before = await self._num_clients()
        if fault.variant == "socket":
            outcome.target = "raw DEALER socket"
            await self._vanish_socket()
            outcome.detail = f"submitted {VANISH_REQUESTS} streamed requests, closed without reading"
        else:
            outcome.target = "client process"
            outcome.detail = await self._vanish_process()
        vanished_at = time.monotonic()
        timeout_s = self.config.client_timeout_s + 5.0
        forgotten = before is not None and await self._wait_clients(before, timeout_s)
        waited_s = time.monotonic() - vanished_at
        outcome.detail += (
            f"; the hub forgot it after {waited_s:.1f} s"
            if forgotten
            else f"; the hub still held it after {waited_s:.1f} s ({before} client(s) before it came)"
        )
        self.vanished.append(forgotten)

    async def _num_clients(self) -> int | None:
        status = await self.cluster.link.status(timeout_s=5.0)
        clients = (status or {}).get("totals", {}).get("clients")
        return clients if isinstance(clients, int) else None

    async def _wait_clients(self, at_most: int, timeout_s: float) -> bool:
        """Whether the hub's client count is back to ``at_most`` within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            clients = await self._num_clients()
            if clients is not None and clients <= at_most:
                return True
            await asyncio.sleep(0.2)  # the hub's client sweep: poll its status with a deadline
        return False

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
        self.workload.clients.extend(clients)  # their SDK counters count too
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
