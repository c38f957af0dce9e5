"""``dpinfer bench coordinator``: what the hub costs, against talking to a rank directly.

One run measures ``direct`` (the load generator against one null rank that binds its own
ROUTER; no hub) and ``coordinator`` (the same load through a hub with 1, 2, 4... null
ranks): throughput at a fixed window in flight (best of alternating rounds, so background
load hits both alike), round-trip latency at concurrency 1 (p50/p99), and the hub's own CPU
time per request (``/proc/<pid>``, every thread). The generator is a raw DEALER speaking the
protocol with pre-packed bodies that refills the window in one batch per receive wake-up,
the same code for both cases. The SDK is measured too (``InferenceClient`` latency,
``AsyncInferenceClient`` throughput). Null ranks answer at once, so every figure is pure
messaging overhead; all processes share the machine's cores, so compare ratios within a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, NotRequired, TypedDict

import click

from dpinfer.bench.loadgen import RawLoad, Target, TargetStats, interleave
from dpinfer.bench.relay import start_bare_relay
from dpinfer.bench.report import (
    Column,
    MachineInfo,
    emit,
    json_option,
    latency_summary_us,
    machine_info,
    render_table,
)
from dpinfer.errors import RequestTimeoutError

if TYPE_CHECKING:
    from rich.table import Table

TARGETS = {"ratio_vs_direct_min": 0.6, "coordinator_cpu_us_per_req_max": 20.0, "added_p50_us_max": 100.0}


class Case(TargetStats):
    """One entry of the report's ``cases``: ``direct``, ``bare_relay`` or ``coordinator``."""

    case: str
    ranks: int
    routing: NotRequired[str]
    """Coordinator cases: the hub's routing policy."""
    ratio_vs_direct: NotRequired[float]
    added_p50_us: NotRequired[float]
    """Added p50 latency over the direct case (not on the direct case itself)."""
    added_p50_over_relay_us: NotRequired[float]
    """Coordinator cases only: added p50 latency over the bare relay."""


class SdkStats(TypedDict):
    """The SDK clients through a one-rank coordinator."""

    sync_p50_us: float
    sync_p99_us: float
    async_req_per_s: float
    sync_added_p50_us: NotRequired[float]
    """Sync client p50 over the raw generator's p50 on the same deployment."""


class Settings(TypedDict):
    requests: int
    concurrency: int
    latency_requests: int
    rounds: int


class CoordinatorReport(TypedDict):
    """What ``dpinfer bench coordinator --json`` prints."""

    benchmark: str
    ratio_vs_direct: float
    ratio_ranks: int
    cases: list[Case]
    sdk: SdkStats
    targets: dict[str, float]
    settings: Settings
    machine: MachineInfo
    cache_aware_cpu_vs_round_robin: NotRequired[float]
    """Hub CPU per request, cache_aware over round_robin, same ranks, same keyed load (worst
    over rank counts; the issue's target: at most 2)."""


def wait_for_ranks(
    address: str, num_ranks: int, timeout_s: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll the coordinator's status until ``num_ranks`` ranks are live (bounded by ``timeout_s``).

    With ``process`` (a ``Popen`` of the rank), fail at once if it exits instead of waiting.
    """
    from dpinfer.client.sync_client import InferenceClient

    deadline = time.monotonic() + timeout_s
    with InferenceClient(address, timeout_s=timeout_s) as client:
        while client.status()["totals"]["live_ranks"] < num_ranks:
            if process is not None and process.poll() is not None:
                raise RequestTimeoutError(
                    f"the rank exited with code {process.returncode} before it was live"
                )
            if time.monotonic() > deadline:
                raise RequestTimeoutError(f"{num_ranks} rank(s) did not register within {timeout_s:g} s")
            time.sleep(0.02)


@contextlib.contextmanager
def null_deployment(num_ranks: int, routing: str = "round_robin") -> Iterator[tuple[str, int]]:
    """A coordinator with ``num_ranks`` live null ranks: ``(address, coordinator pid)``; all ended after.

    Under ``cache_aware`` the null ranks report a simulated cache of 512 keys (LRU), smaller
    than the keyed load's 1,088 keys, so insert and evict reports flow all the time.
    """
    from dpinfer.config import CoordinatorConfig, RoutingPolicyName
    from dpinfer.coordinator.process import start_coordinator
    from dpinfer.testing.null_rank import start_null_engines

    handle = start_coordinator(CoordinatorConfig(port=0, routing=RoutingPolicyName(routing)))
    procs: list[BaseProcess] = []
    try:
        procs = start_null_engines(
            handle.address, ranks=list(range(num_ranks)), stream_chunks=0, cache_keys=512
        )
        wait_for_ranks(handle.address, num_ranks)
        yield handle.address, handle.pid
    finally:
        handle.stop()  # SHUTDOWN stops the ranks too
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _measure_sdk(address: str, requests: int, window: int, latency_requests: int) -> SdkStats:
    from dpinfer.client.async_client import AsyncInferenceClient
    from dpinfer.client.sync_client import InferenceClient
    from dpinfer.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=1)
    latencies = []
    with InferenceClient(address) as client:
        client.generate("x", sampling)
        for _ in range(latency_requests):
            start = time.perf_counter()
            client.generate("x", sampling)
            latencies.append(time.perf_counter() - start)

    async def windowed() -> float:
        async with AsyncInferenceClient(address) as aclient:
            remaining = requests

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await aclient.add_request("x", sampling)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(window)))
            return time.perf_counter() - start

    sync = latency_summary_us(latencies)
    async_req_per_s = round(requests / asyncio.run(windowed()), 1)
    return {"sync_p50_us": sync["p50_us"], "sync_p99_us": sync["p99_us"], "async_req_per_s": async_req_per_s}


def _hub_case(
    num_ranks: int,
    routing: str,
    keyed: bool,
    direct: Target,
    relay: Target,
    requests: int,
    concurrency: int,
    latency_requests: int,
    rounds: int,
) -> Case:
    with null_deployment(num_ranks, routing) as (address, pid):
        hub = Target(RawLoad(address, via_coordinator=True, keyed=keyed), pid)
        # The bare relay runs beside the first case only: it is the floor, not a system.
        others = [relay] if not relay.round_s else []
        try:
            interleave([direct, *others, hub], requests, concurrency, latency_requests, rounds)
        finally:
            hub.load.close()
    # Paired with the direct rounds run just before each of its own: robust to drifting load.
    paired = [d / h for d, h in zip(direct.round_s[-rounds:], hub.round_s, strict=True)]
    case: Case = {"case": "coordinator", "ranks": num_ranks, "routing": routing, **hub.stats(requests)}
    case["ratio_vs_direct"] = round(statistics.median(paired), 3)
    return case


def run_benchmark(
    ranks: Sequence[int] = (1, 2, 4),
    requests: int = 10000,
    concurrency: int = 128,
    latency_requests: int = 2000,
    rounds: int = 3,
    routings: Sequence[str] = ("round_robin",),
) -> CoordinatorReport:
    """Every case in one run; the report dict that ``--json`` prints.

    The direct rank stays up for the whole run and is measured in alternation with each
    coordinator case; throughput is the best of ``rounds`` rounds of ``requests`` requests, and
    ``ratio_vs_direct`` the median over rounds of coordinator/direct throughput (each round
    paired with the direct round just before it).
    """
    if not ranks or min(ranks) < 1 or min(requests, concurrency, latency_requests, rounds) < 1:
        raise click.BadParameter("ranks, requests, concurrency, latency requests and rounds must be >= 1")
    from dpinfer.testing.null_direct import start_direct_null_engine

    keyed = "cache_aware" in routings  # then every target gets the same keyed, shared-prefix load
    proc, direct_address = start_direct_null_engine(stream_chunks=0)
    relay_proc, relay_address = start_bare_relay(direct_address)
    direct = Target(RawLoad(direct_address, via_coordinator=False, keyed=keyed), None)
    relay = Target(RawLoad(relay_address, via_coordinator=False, keyed=keyed), relay_proc.pid)
    cases: list[Case] = []
    sdk: SdkStats | None = None
    try:
        for num_ranks in sorted(set(ranks)):
            for routing in dict.fromkeys(routings):
                case = _hub_case(num_ranks, routing, keyed, direct, relay, requests, concurrency,
                                 latency_requests, rounds)  # fmt: skip
                cases.append(case)
                if sdk is None:
                    with null_deployment(num_ranks, routing) as (address, _):
                        sdk = _measure_sdk(address, requests, concurrency, latency_requests)
    finally:
        direct.load.close()
        relay.load.close()
        for p in (relay_proc, proc):
            p.kill()
            p.join(5)
    direct_case: Case = {"case": "direct", "ranks": 1, **direct.stats(requests)}
    relay_case: Case = {"case": "bare_relay", "ranks": 1, **relay.stats(requests)}
    paired = [d / r for d, r in zip(direct.round_s[:rounds], relay.round_s, strict=True)]
    relay_case["ratio_vs_direct"] = round(statistics.median(paired), 3)
    cases.insert(0, relay_case)
    for case in cases:
        case["added_p50_us"] = round(case["p50_us"] - direct_case["p50_us"], 1)
    cases.insert(0, direct_case)
    hubs = [c for c in cases if c["case"] == "coordinator"]
    one_rank = next((c for c in hubs if c["ranks"] == 1), hubs[0])
    for case in hubs:
        case["added_p50_over_relay_us"] = round(case["p50_us"] - relay_case["p50_us"], 1)
    assert sdk is not None
    sdk["sync_added_p50_us"] = round(sdk["sync_p50_us"] - one_rank["p50_us"], 1)
    settings = Settings(
        requests=requests, concurrency=concurrency, latency_requests=latency_requests, rounds=rounds
    )
    report: CoordinatorReport = {
        "benchmark": "coordinator",
        "ratio_vs_direct": one_rank["ratio_vs_direct"],
        "ratio_ranks": one_rank["ranks"],
        "cases": cases,
        "sdk": sdk,
        "targets": TARGETS,
        "settings": settings,
        "machine": machine_info(),
    }
    cpu = {(c["ranks"], c.get("routing")): c["coordinator_cpu_us_per_req"] or 0.0 for c in hubs}
    ratios = [cpu[(n, "cache_aware")] / cpu[(n, "round_robin")] for n, r in cpu if r == "cache_aware"
              if cpu.get((n, "round_robin"))]  # fmt: skip
    if ratios:
        report["cache_aware_cpu_vs_round_robin"] = round(max(ratios), 2)
    return report


_COLUMNS = [
    Column("case", "case", justify="left"),
    Column("ranks", "ranks", "{:d}"),
    Column("routing", "routing", "{}", justify="left"),
    Column("req_per_s", "req/s", "{:,.0f}"),
    Column("ratio_vs_direct", "vs direct", "{:.2f}"),
    Column("p50_us", "p50 µs"),
    Column("p99_us", "p99 µs"),
    Column("added_p50_us", "+p50 µs"),
    Column("added_p50_over_relay_us", "over relay µs"),
    Column("coordinator_cpu_us_per_req", "hub CPU µs/req"),
    Column("coordinator_cpu_us_per_req_c1", "at c=1"),
]
_SDK_COLUMNS = [
    Column("sync_p50_us", "sync p50 µs"),
    Column("sync_p99_us", "sync p99 µs"),
    Column("sync_added_p50_us", "vs raw p50 µs"),
    Column("async_req_per_s", "async req/s", "{:,.0f}"),
]


def _tables(report: CoordinatorReport) -> list[Table]:
    title = (
        f"coordinator overhead: req/s = best of {report['settings']['rounds']} rounds of "
        f"{report['settings']['requests']:,} requests at {report['settings']['concurrency']} in flight "
        "(vs direct: median of paired rounds); latency at concurrency 1"
    )
    tables = [render_table(title, _COLUMNS, report["cases"])]
    if report.get("sdk"):
        tables.append(render_table("SDK through the coordinator (1 rank)", _SDK_COLUMNS, [report["sdk"]]))
    return tables


def _notes(report: CoordinatorReport) -> list[str]:
    cases = [c for c in report["cases"] if c["case"] == "coordinator"]
    relay = next(c for c in report["cases"] if c["case"] == "bare_relay")
    worst_cpu = max(c["coordinator_cpu_us_per_req"] or 0.0 for c in cases)  # never None with a hub
    worst_added = max(c["added_p50_us"] for c in cases)
    checks = [
        f"ratio vs direct {report['ratio_vs_direct']:.2f} (target >= {TARGETS['ratio_vs_direct_min']})",
        f"coordinator CPU {worst_cpu:.1f} µs/req (target <= {TARGETS['coordinator_cpu_us_per_req_max']:g})",
        f"added p50 {worst_added:.0f} µs (target <= {TARGETS['added_p50_us_max']:g})",
    ]
    if "cache_aware_cpu_vs_round_robin" in report:
        ratio = report["cache_aware_cpu_vs_round_robin"]
        checks.append(f"cache_aware hub CPU {ratio:.2f}x round_robin's (target <= 2)")
    machine = report["machine"]
    return [
        "targets: " + "; ".join(checks),
        f"floor: a bare pyzmq relay (no protocol work) adds {relay['added_p50_us']:.0f} µs here; the "
        f"coordinator adds {min(c['added_p50_over_relay_us'] for c in cases):.0f} µs on top of it",
        f"{machine['cpus']} CPUs, load {machine['load_avg_1m']}: generator, hub and ranks share them; "
        "compare ratios within one run.",
    ]


_INT = click.IntRange(min=1)


@click.command(context_settings={"show_default": True})
@click.option(
    "--ranks", multiple=True, type=_INT, help="Null ranks per coordinator case (repeatable) [1, 2, 4]."
)
@click.option("--requests", type=_INT, default=10000, help="Requests per throughput round.")
@click.option("--concurrency", type=_INT, default=128, help="Requests in flight during throughput rounds.")
@click.option("--latency-requests", type=_INT, default=2000, help="Requests sent one at a time, per case.")
@click.option(
    "--rounds", type=_INT, default=3, help="Alternating direct/coordinator rounds; best one counts."
)
@click.option(
    "--routing",
    "routings",
    multiple=True,
    type=click.Choice(["round_robin", "least_loaded", "cache_aware"]),
    help="Hub routing per coordinator case (repeatable) [round_robin]. With cache_aware, round_robin "
    "runs too and every target gets a keyed load of shared prefixes (null ranks report a simulated cache).",
)
@json_option
def command(
    ranks: tuple[int, ...],
    requests: int,
    concurrency: int,
    latency_requests: int,
    rounds: int,
    routings: tuple[str, ...],
    as_json: bool,
) -> None:
    """Coordinator overhead vs a direct client<->rank baseline (null ranks, loopback)."""
    routings = routings or ("round_robin",)
    if "cache_aware" in routings and "round_robin" not in routings:
        routings = ("round_robin", *routings)
    report = run_benchmark(ranks or (1, 2, 4), requests, concurrency, latency_requests, rounds, routings)
    emit(report, as_json, _tables, _notes(report))
