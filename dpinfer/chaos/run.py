"""``run_chaos``: start the deployment, take references, attack it while the workload runs, stop, check.

The phases: start (coordinator, then ``torchrun``), the undisturbed reference pass, the fault
phase (workload, monitor and the fault schedule side by side for ``duration_s``), the drain
(every workload request waited for), the end checks (vanished clients forgotten, counters read
once more), the orderly stop, and the leftovers check. Whatever happens, ``force_cleanup``
then ends every process and removes every file the deployment may have left.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpinfer.chaos.cluster import Cluster, ClusterConfig
from dpinfer.chaos.faults import FaultOutcome, Injector
from dpinfer.chaos.invariants import (
    OVERLOADED,
    Check,
    check_floods,
    check_leftovers,
    check_memory,
    check_recovered,
    check_requests,
    check_vanished,
)
from dpinfer.chaos.monitor import MIGRATION_COUNTERS, RESUBMISSION_COUNTERS, Monitor
from dpinfer.chaos.plan import RESTARTING_KINDS, ChaosConfig, FaultKind, PlannedFault, draw_schedule
from dpinfer.chaos.workload import SAMPLED, Workload, request_pool

ProgressFn = Callable[[str, float], None]
"""``progress(line, fraction)``: what the run is doing, and how far the fault phase has come (0-1)."""
LEFTOVER_WAIT_S = 10.0
"""How long processes may take to be reaped after an orderly stop before they count as left."""


@dataclass
class ChaosResult:
    config: ChaosConfig
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    faults: list[FaultOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_dir: str | None = None
    """Where the deployment's logs are (None once removed)."""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def cluster_config(config: ChaosConfig) -> ClusterConfig:
    return ClusterConfig(
        model=config.model,
        dp=config.dp,
        max_restarts=config.max_restarts,
        heartbeat_timeout_s=config.heartbeat_timeout_s,
        heartbeat_interval_s=min(0.25, config.heartbeat_timeout_s / 4),
        max_queued_requests=config.max_queued_requests,
        max_client_requests=config.max_client_requests,
        client_timeout_s=config.client_timeout_s,
    )


async def run_chaos(config: ChaosConfig, progress: ProgressFn) -> ChaosResult:
    cluster = Cluster(cluster_config(config))
    result = ChaosResult(config, log_dir=cluster.config.log_dir)
    try:
        await _run(cluster, config, result, progress)
    finally:
        cluster.force_cleanup()
    return result


async def _run(cluster: Cluster, config: ChaosConfig, result: ChaosResult, progress: ProgressFn) -> None:
    progress(f"starting the coordinator and {config.dp} rank(s) of {config.model}", 0.0)
    await cluster.start()
    workload = Workload(cluster.address, request_pool(config.seed), config.deadline_s, config.seed)
    progress("reference pass (no faults)", 0.0)
    await workload.reference_pass(config.concurrency)
    monitor = Monitor(cluster)
    await monitor.poll()
    schedule = draw_schedule(config.seed, config.faults, config.dp, config.max_restarts, config.gap_s)
    started = time.monotonic()
    injector = Injector(cluster, workload, monitor, config, started)
    stop_load, stop_watch = asyncio.Event(), asyncio.Event()
    load = asyncio.create_task(workload.run(config.concurrency, stop_load))
    watch = asyncio.create_task(monitor.run(stop_watch))
    ticker = asyncio.create_task(_tick(workload, result, config, started, progress, stop_load))
    vanished: Check | None = None
    fault_phase_s = 0.0
    try:
        await _inject(injector, schedule, config, started, result)
        progress("waiting for restarting ranks", 1.0)
        await injector.settle()
        await asyncio.sleep(max(0.0, config.duration_s - (time.monotonic() - started)))
        fault_phase_s = time.monotonic() - started
        stop_load.set()
        progress("draining: waiting for every request's final reply", 1.0)
        await load
        await workload.close()
        vanished = await _vanished_check(cluster, injector, config) if injector.vanished else None
        await monitor.poll()
    except BaseException:  # Ctrl-C or a failure: stop at once, force_cleanup ends the rest
        injector.cancel()
        for task in (load, watch, ticker):
            task.cancel()
        raise
    finally:
        stop_load.set()
        stop_watch.set()
        await asyncio.gather(load, watch, ticker, return_exceptions=True)
    progress("stopping the deployment", 1.0)
    await cluster.stop()
    leftovers = await _leftovers(cluster)
    result.checks = check_requests(workload.records, workload.references, workload.foreign_finals)
    if FaultKind.FLOOD in result_kinds(result):
        result.checks.append(check_floods(workload.records, injector.overloaded_expected))
    if vanished is not None:
        result.checks.append(vanished)
    result.checks += [
        check_recovered(result.faults),
        check_memory(
            monitor.hub_peak_bytes,
            monitor.rank_growth_bytes,
            config.max_hub_rss_bytes,
            config.max_rank_growth_bytes,
        ),
        check_leftovers(leftovers),
    ]
    result.figures = _figures(workload, monitor, cluster, result, fault_phase_s)
    result.notes += [
        f"this coordinator has no {opt}; the harness ran without it" for opt in cluster.unsupported
    ]
    for figure, names in (("migrations", MIGRATION_COUNTERS), ("resubmissions", RESUBMISSION_COUNTERS)):
        if result.figures[figure] is None:
            sdk = " and the SDK clients have no num_resubmitted" if figure == "resubmissions" else ""
            result.notes.append(
                f"{figure}: n/a (the coordinator's status has no counter {' or '.join(names)}{sdk})"
            )


def result_kinds(result: ChaosResult) -> set[FaultKind]:
    return {FaultKind(o.kind) for o in result.faults if not o.skipped}


async def _inject(
    injector: Injector, schedule: list[PlannedFault], config: ChaosConfig, started: float, result: ChaosResult
) -> None:
    """Faults in schedule order, except that one which would end a rank while another rank is
    still restarting waits (the next ones go first) until that restart is over."""
    queue, deferred = list(schedule), list[PlannedFault]()
    while queue or deferred:
        if deferred and not injector.restarting:
            fault = deferred.pop(0)
        elif queue:
            fault = queue.pop(0)
            if fault.kind in RESTARTING_KINDS and injector.restarting:
                deferred.append(fault)
                continue
        else:
            await injector.settle()
            continue
        if time.monotonic() - started + fault.gap_s >= config.duration_s:
            return
        await asyncio.sleep(fault.gap_s)
        outcome = await injector.inject(fault)
        result.faults.append(outcome)
        if not outcome.recovered:
            return  # a deployment that did not come back: no further faults on top of it


async def _tick(
    workload: Workload,
    result: ChaosResult,
    config: ChaosConfig,
    started: float,
    progress: ProgressFn,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        elapsed = time.monotonic() - started
        done = sum(1 for r in workload.records if r.finals)
        last = result.faults[-1].kind if result.faults else "none yet"
        line = f"{done} requests done, {len(result.faults)} fault(s) (last: {last})"
        progress(line, min(1.0, elapsed / config.duration_s))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def _vanished_check(cluster: Cluster, injector: Injector, config: ChaosConfig) -> Check:
    """At the end, with the run's own clients gone: the hub holds only the harness's status client
    and no request; and each vanished client was forgotten when it vanished."""
    deadline = time.monotonic() + config.client_timeout_s + 5.0
    clients = in_flight = None
    while True:
        status = await cluster.link.status(timeout_s=2.0)
        totals = (status or {}).get("totals", {})
        clients, in_flight = totals.get("clients"), totals.get("in_flight")
        if (clients == 1 and in_flight == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)  # the hub's client sweep: poll its status with a deadline
    return check_vanished(injector.vanished, clients, in_flight, expected_clients=1)


async def _leftovers(cluster: Cluster) -> dict[str, list[str]]:
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while True:
        left = cluster.leftovers()
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)  # the last children are being reaped


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _figures(
    workload: Workload, monitor: Monitor, cluster: Cluster, result: ChaosResult, fault_phase_s: float
) -> dict[str, Any]:
    records = workload.records
    errors = Counter(r.error_code or r.finish_reason or "none" for r in records if r.finals and not r.ok)
    sampled = [r for r in records if r.spec.kind == SAMPLED and r.ok]
    sampled_same = sum(1 for r in sampled if workload.references[r.spec].token_ids == r.token_ids)
    injected = Counter(o.kind for o in result.faults if not o.skipped)
    return {
        "fault_phase_s": round(fault_phase_s, 1),
        "requests": len(records),
        "requests_ok": sum(1 for r in records if r.ok),
        "requests_by_kind": dict(Counter(r.spec.kind for r in records)),
        "streamed": sum(1 for r in records if r.stream),
        "errors_by_code": dict(errors),
        "faults_injected": dict(injected),
        "faults_skipped": sum(1 for o in result.faults if o.skipped),
        "migrations": monitor.counter(*MIGRATION_COUNTERS),
        "resubmissions": _first(
            workload.sdk_counter("num_resubmitted"), monitor.counter(*RESUBMISSION_COUNTERS)
        ),
        "sdk_reconnects": workload.sdk_counter("num_reconnects"),
        "sdk_duplicates": workload.sdk_counter("num_duplicates"),
        "redispatched": monitor.counter("redispatched"),
        "rank_deaths": monitor.counter("rank_deaths"),
        "overload_replies": sum(1 for r in records if r.error_code == OVERLOADED),
        "hub_overloaded_counter": monitor.counter("overloaded"),
        "coordinator_restarts": cluster.coordinator_starts - 1,
        "sampled_equal_reference": f"{sampled_same}/{len(sampled)}",
        "dropped_outputs": workload.num_dropped,
        "longest_latency_s": round(max((r.latency_s or 0.0 for r in records), default=0.0), 2),
        "peak_hub_rss_mb": round(monitor.hub_peak_bytes / 2**20, 1),
        "peak_rank_rss_mb": round(monitor.rank_peak_bytes / 2**20, 1),
        "rank_growth_mb": round(monitor.rank_growth_bytes / 2**20, 1),
    }
