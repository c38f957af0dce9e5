"""``dpinfer bench http``: the OpenAI-compatible HTTP front under load, beside the SDK.

A coordinator with one null rank, one HTTP front per ``--api-workers`` value (all on that
coordinator) and the load process (``http_load``), measured case after case in each round:
``sdk`` (the same load through ``AsyncInferenceClient``, no HTTP: the in-run reference),
``http`` (non-streamed ``POST /v1/completions``, an 8-token prompt, ``max_tokens`` 4: req/s
at ``--concurrency`` in flight, p50/p99 at concurrency 1) and ``http_stream`` (SSE: the null
rank streams 128 one-token deltas per request; delta tokens received per second). Throughput
is the best round; CPU (``/proc``: the front's API workers, the hub, the load process) is the
total over the measured rounds per request or per streamed token. Null ranks answer at once,
so every figure is the cost of the way in; every process shares the machine's cores.
"""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Literal, TypedDict, cast

import click

from dpinfer.bench.http_load import Job, LoadProcess, Tally
from dpinfer.bench.report import Column, emit, json_option, machine_info, percentile, render_table

if TYPE_CHECKING:
    from rich.table import Table

    from dpinfer.bench.report import MachineInfo
    from dpinfer.http.server import HttpFront

PROMPT = "abcdefgh"  # 8 tokens: the null rank's tokens are the UTF-8 bytes
MAX_TOKENS = 4
STREAM_TOKENS = 128
# The null rank streams "echo: " + prompt as stream_chunks + 1 deltas of len // (chunks + 1) bytes.
STREAM_PROMPT = "x" * (STREAM_TOKENS - len("echo: "))
STREAM_CHUNKS = STREAM_TOKENS - 1
LOAD_CLIENT = "raw asyncio HTTP/1.1 keep-alive protocol (uvloop), prebuilt requests, one process"


class Peer(TypedDict):
    system: str
    req_per_s: list[float]
    req_per_s_four_replicas: list[float]
    p50_ms: list[float]
    front_cpu_us_per_req: list[float]


class Targets(TypedDict):
    """Issue 10's targets for one API worker, and the peer's figures on this machine class."""

    req_per_s_min: float
    p50_ms_max: float
    front_cpu_us_per_req_max: float
    tokens_per_s_min: float
    front_cpu_us_per_token_max: float
    two_worker_scaling_min: float
    peer: Peer


TARGETS: Targets = {
    "req_per_s_min": 2800.0,
    "p50_ms_max": 1.5,
    "front_cpu_us_per_req_max": 300.0,
    "tokens_per_s_min": 15000.0,
    "front_cpu_us_per_token_max": 60.0,
    "two_worker_scaling_min": 1.3,
    "peer": {
        "system": "Megatron-LM HTTP front (Quart + Hypercorn), null engines",
        "req_per_s": [1356.0, 1479.0],
        "req_per_s_four_replicas": [1801.0, 2066.0],
        "p50_ms": [5.6, 5.8],
        "front_cpu_us_per_req": [630.0, 710.0],
    },
}


class Case(TypedDict):
    """One entry of the report's ``cases``; ``None`` where a figure does not apply."""

    case: Literal["sdk", "http", "http_stream"]
    api_workers: int | None
    req_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    tokens_per_s: float | None
    front_cpu_us_per_req: float | None
    front_cpu_us_per_token: float | None
    hub_cpu_us_per_req: float | None
    hub_cpu_us_per_token: float | None
    load_cpu_us_per_req: float | None
    """The load process (for ``sdk``, that is the SDK client itself)."""
    load_cpu_us_per_token: float | None
    rounds: list[float]
    """Each round's req/s (``http``) or tokens/s (``http_stream``; ``sdk``: req/s)."""
    vs_sdk: float | None
    """Throughput over the SDK's (req/s or tokens/s)."""
    requests: int
    """Requests measured (rounds, latency runs); every one succeeded (a failure stops the run)."""


class Settings(TypedDict):
    requests: int
    stream_requests: int
    concurrency: int
    latency_requests: int
    rounds: int
    api_workers: list[int]
    stream_tokens: int


class Check(TypedDict):
    """One of issue 10's targets against what this run measured (``met`` is None if not measured)."""

    target: str
    bound: float
    measured: float | None
    met: bool | None


class HttpReport(TypedDict):
    """What ``dpinfer bench http --json`` prints."""

    benchmark: str
    cases: list[Case]
    two_worker_scaling: float | None
    checks: list[Check]
    targets: Targets
    load_client: str
    settings: Settings
    machine: MachineInfo
    machine_busy_pct: float
    """How busy the whole machine's CPUs were over the measured rounds (every process, ours or not)."""


@dataclass
class _Way:
    """One way in (the SDK, or an HTTP front) and what was measured through it."""

    kind: Literal["sdk", "http"]
    target: str
    api_workers: int | None = None
    front_pids: list[int] = field(default_factory=list)
    requests: Tally = field(default_factory=Tally)
    tokens: Tally = field(default_factory=Tally)
    latencies_s: list[float] = field(default_factory=list)

    def run(self, load: LoadProcess, hub_pid: int, job: Job, counted: bool = True) -> None:
        """Run ``job`` through this way; a counted one adds latencies or a throughput round."""
        result, cpu_s = load.run(job, [*self.front_pids, hub_pid, load.pid])
        if result.failed:  # the figures would mean nothing: stop (every process is ended)
            name = f"{self.kind} ({self.api_workers} API workers)" if self.api_workers else self.kind
            raise click.ClickException(
                f"{result.failed} of {job.num_requests} {'streamed ' if job.stream else ''}requests "
                f"through {name} failed; the first: {result.first_error}"
            )
        if not counted:
            return
        tally = self.tokens if job.stream else self.requests
        tally.num_requests += result.ok
        if job.timed:
            self.latencies_s.extend(result.latencies_s)
        else:
            tally.add(result.tokens if job.stream else result.ok, result.elapsed_s, cpu_s)


@contextlib.contextmanager
def _deployment(api_workers: Sequence[int]) -> Iterator[tuple[int, list[_Way], LoadProcess]]:
    """A coordinator, one null rank, a front per ``api_workers`` value and the load process:
    ``(hub pid, ways in, load)``; every process is ended after, whatever happened."""
    from dpinfer.bench.coordinator import wait_for_ranks
    from dpinfer.config import CoordinatorConfig
    from dpinfer.coordinator.process import start_coordinator
    from dpinfer.http.config import HttpConfig
    from dpinfer.http.server import start_http_front
    from dpinfer.testing.null_rank import start_null_engines

    with contextlib.ExitStack() as stack:  # callbacks run last first: load, fronts, hub, rank
        ranks: list[BaseProcess] = []
        stack.callback(_end_ranks, ranks)
        hub = start_coordinator(CoordinatorConfig(port=0))
        stack.callback(hub.stop)  # SHUTDOWN stops the rank too
        # The rank ignores a terminal's Ctrl-C (it inherits SIG_IGN): the hub stops it in order.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            ranks.extend(start_null_engines(hub.address, ranks=[0], stream_chunks=STREAM_CHUNKS))
        finally:
            signal.signal(signal.SIGINT, previous)
        wait_for_ranks(hub.address, 1)
        ways = [_Way("sdk", hub.address)]
        for workers in api_workers:
            config = HttpConfig(coordinator=hub.address, port=0, api_workers=workers)
            front: HttpFront = start_http_front(config)
            stack.callback(front.stop)
            ways.append(_Way("http", f"{front.config.host}:{front.config.port}", workers, front.pids))
        load = LoadProcess()
        stack.callback(load.close)
        yield hub.pid, ways, load


def _end_ranks(procs: list[BaseProcess]) -> None:
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def run_benchmark(
    requests: int = 8000,
    stream_requests: int = 512,
    concurrency: int = 64,
    latency_requests: int = 2000,
    rounds: int = 5,
    api_workers: Sequence[int] = (1, 2),
) -> HttpReport:
    """Every case in one run (warm-up, then ``rounds`` alternating rounds); the ``--json`` report."""
    workers = sorted(set(api_workers))
    per_round = max(1, latency_requests // rounds)
    with _deployment(workers) as (hub_pid, ways, load):
        with urllib.request.urlopen(f"http://{ways[1].target}/v1/models", timeout=10) as reply:
            model = str(json.load(reply)["data"][0]["id"])  # the name the front serves

        def job(way: _Way, stream: bool, num_requests: int, in_flight: int, timed: bool = False) -> Job:
            prompt, max_tokens = (STREAM_PROMPT, STREAM_TOKENS) if stream else (PROMPT, MAX_TOKENS)
            return Job(way.kind, way.target, model, prompt, max_tokens, stream, num_requests, in_flight,
                       timed, expected_tokens=STREAM_TOKENS if stream else 0)  # fmt: skip

        for way in ways:  # warm-up, not counted
            for stream, count in ((False, min(requests, 1000)), (True, min(stream_requests, concurrency))):
                way.run(load, hub_pid, job(way, stream, count, concurrency), counted=False)
        ticks = _machine_ticks()
        for _ in range(rounds):  # case after case in each round: background load hits them alike
            for way in ways:
                way.run(load, hub_pid, job(way, False, requests, concurrency))
            for way in ways:
                way.run(load, hub_pid, job(way, True, stream_requests, concurrency))
            for way in ways:
                way.run(load, hub_pid, job(way, False, per_round, 1, timed=True))
        total, idle = (now - then for now, then in zip(_machine_ticks(), ticks, strict=True))
        busy = round(100 * (1 - idle / max(total, 1)), 1)
    settings = Settings(
        requests=requests, stream_requests=stream_requests, concurrency=concurrency,
        latency_requests=per_round * rounds, rounds=rounds, api_workers=workers, stream_tokens=STREAM_TOKENS,
    )  # fmt: skip
    return _report(ways, settings, busy)


def _machine_ticks() -> tuple[int, int]:
    """(all, idle + iowait) CPU ticks of the whole machine so far (``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def _ms(latencies_s: list[float], q: float) -> float | None:
    return round(percentile(latencies_s, q) * 1e3, 3) if latencies_s else None


def _case(way: _Way, case: Literal["sdk", "http", "http_stream"], sdk: _Way) -> Case:
    per_req, per_token, front = case != "http_stream", case != "http", way.kind == "http"
    req, tok = way.requests, way.tokens
    best, reference = (req.best(), sdk.requests.best()) if per_req else (tok.best(), sdk.tokens.best())
    return {
        "case": case, "api_workers": way.api_workers,
        "req_per_s": req.best() if per_req else None,
        "p50_ms": _ms(way.latencies_s, 50) if per_req else None,
        "p99_ms": _ms(way.latencies_s, 99) if per_req else None,
        "tokens_per_s": tok.best() if per_token else None,
        "front_cpu_us_per_req": req.us(req.front_s) if front and per_req else None,
        "front_cpu_us_per_token": tok.us(tok.front_s) if front and per_token else None,
        "hub_cpu_us_per_req": req.us(req.hub_s) if per_req else None,
        "hub_cpu_us_per_token": tok.us(tok.hub_s) if per_token else None,
        "load_cpu_us_per_req": req.us(req.load_s) if per_req else None,
        "load_cpu_us_per_token": tok.us(tok.load_s) if per_token else None,
        "rounds": [round(r, 1) for r in (req if per_req else tok).rates],
        "vs_sdk": round(best / reference, 3) if front and best and reference else None,
        "requests": (req.num_requests if per_req else 0) + (tok.num_requests if per_token else 0),
    }  # fmt: skip


def _checks(cases: list[Case], scaling: float | None) -> list[Check]:
    """Issue 10's targets, each against the 1-worker figure it bounds (``*_min``: at least)."""
    one = {c["case"]: c for c in cases if c["api_workers"] == 1}
    http, stream = one.get("http"), one.get("http_stream")
    measured: dict[str, float | None] = {
        "req_per_s_min": http and http["req_per_s"],
        "p50_ms_max": http and http["p50_ms"],
        "front_cpu_us_per_req_max": http and http["front_cpu_us_per_req"],
        "tokens_per_s_min": stream and stream["tokens_per_s"],
        "front_cpu_us_per_token_max": stream and stream["front_cpu_us_per_token"],
        "two_worker_scaling_min": scaling,
    }
    bounds = cast(Mapping[str, float], TARGETS)
    checks: list[Check] = []
    for name, value in measured.items():
        bound = bounds[name]
        met = None if value is None else value >= bound if name.endswith("_min") else value <= bound
        checks.append({"target": name, "bound": bound, "measured": value, "met": met})
    return checks


def _report(ways: list[_Way], settings: Settings, machine_busy_pct: float) -> HttpReport:
    sdk, fronts = ways[0], ways[1:]
    cases = [_case(sdk, "sdk", sdk)]
    cases += [_case(way, "http", sdk) for way in fronts]
    cases += [_case(way, "http_stream", sdk) for way in fronts]
    one, two = (next((w.requests.best() for w in fronts if w.api_workers == n), None) for n in (1, 2))
    scaling = round(two / one, 3) if one and two else None
    return {
        "benchmark": "http", "cases": cases, "two_worker_scaling": scaling,
        "checks": _checks(cases, scaling), "targets": TARGETS, "load_client": LOAD_CLIENT,
        "settings": settings, "machine": machine_info(), "machine_busy_pct": machine_busy_pct,
    }  # fmt: skip


_KEY_COLUMNS = [Column("case", "case", justify="left"), Column("api_workers", "API\nworkers", "{:d}")]
_COLUMNS = [
    *_KEY_COLUMNS,
    Column("req_per_s", "req/s", "{:,.0f}"),
    Column("p50_ms", "p50\nms", "{:.2f}"),
    Column("p99_ms", "p99\nms", "{:.2f}"),
    Column("tokens_per_s", "tokens/s", "{:,.0f}"),
    Column("vs_sdk", "vs\nsdk", "{:.2f}"),
    Column("requests", "requests", "{:,d}"),
]
_CPU_COLUMNS = _KEY_COLUMNS + [
    Column(f"{who}_cpu_us_per_{unit}", f"{who}\nµs/{unit[:3]}", "{:,.1f}")
    for who in ("front", "hub", "load")
    for unit in ("req", "token")
]


def _tables(report: HttpReport) -> list[Table]:
    s = report["settings"]
    title = (
        f"HTTP front vs SDK, null rank: best of {s['rounds']} rounds, {s['concurrency']} in flight "
        f"({s['requests']:,} requests; {s['stream_requests']:,} streams of {s['stream_tokens']} "
        "tokens); latency at concurrency 1"
    )
    cpu_title = "CPU µs per request or streamed token, over the measured rounds"
    cases = report["cases"]
    return [render_table(title, _COLUMNS, cases), render_table(cpu_title, _CPU_COLUMNS, cases)]


def _notes(report: HttpReport) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    notes = [
        f"target {c['target']} {c['bound']:,g}: {verdict[c['met']]}"
        + ("" if c["measured"] is None else f" ({c['measured']:,.2f})")
        for c in report["checks"]
    ]
    peer = TARGETS["peer"]
    notes.append(
        f"peer, {peer['system']}: {peer['req_per_s'][0]:,.0f}-{peer['req_per_s'][1]:,.0f} req/s, "
        f"p50 {peer['p50_ms'][0]}-{peer['p50_ms'][1]} ms, {peer['front_cpu_us_per_req'][0]:.0f}-"
        f"{peer['front_cpu_us_per_req'][1]:.0f} µs front CPU/req"
    )
    machine = report["machine"]
    notes.append(f"load: {report['load_client']} (for sdk, the load CPU is the SDK client's own)")
    notes.append(
        f"{machine['cpus']} CPUs, load {machine['load_avg_1m']}, {report['machine_busy_pct']}% busy over the "
        "rounds (all processes, other users' too): everything shares them"
    )
    return notes


_INT = click.IntRange(min=1)


@click.command(context_settings={"show_default": True})
@click.option("--requests", type=_INT, default=8000, help="Non-streamed requests per throughput round.")
@click.option("--stream-requests", type=_INT, default=512, help="Streamed requests (128 tokens) per round.")
@click.option("--concurrency", type=_INT, default=64, help="Requests in flight during throughput rounds.")
@click.option("--latency-requests", type=_INT, default=2000, help="Requests sent one at a time, per case.")
@click.option("--rounds", type=_INT, default=5, help="Alternating rounds over the cases; best one counts.")
@click.option("--api-workers", multiple=True, type=_INT, help="API workers of a front (repeatable) [1, 2].")
@json_option
def command(
    requests: int, stream_requests: int, concurrency: int, latency_requests: int, rounds: int,
    api_workers: tuple[int, ...], as_json: bool,
) -> None:  # fmt: skip
    """The HTTP front (OpenAI /v1/completions, SSE) vs the SDK, null ranks behind (loopback)."""
    workers = api_workers or (1, 2)
    report = run_benchmark(requests, stream_requests, concurrency, latency_requests, rounds, workers)
    emit(report, as_json, _tables, _notes(report))
