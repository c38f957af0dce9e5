"""``dpinfer bench serve``: the whole deployment (coordinator + torchrun ranks) under load.

For each ``--dp`` value, one deployment is started with one torch thread per rank, the same
fixed request stream (seeded prompt and output lengths, ``ignore_eos`` so lengths hold) is sent
at once through the async client with streaming on, and the report gives output tokens/s,
requests/s, time to first token and time per output token (p50/p99, measured by the client)
and how many requests each rank served. ``scaling`` is output tokens/s at dp=2 over dp=1.
"""

from __future__ import annotations

import asyncio
import collections
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import click

from dpinfer.bench.report import (
    Column,
    MachineInfo,
    emit,
    json_option,
    machine_info,
    percentile,
    render_table,
)

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass(frozen=True)
class Workload:
    num_requests: int = 128
    min_prompt_len: int = 32
    max_prompt_len: int = 256
    min_output_len: int = 32
    max_output_len: int = 128
    seed: int = 0

    def requests(self) -> list[tuple[str, int]]:
        rng = random.Random(self.seed)
        alphabet = string.ascii_letters + " "
        return [
            (
                "".join(rng.choices(alphabet, k=rng.randint(self.min_prompt_len, self.max_prompt_len))),
                rng.randint(self.min_output_len, self.max_output_len),
            )
            for _ in range(self.num_requests)
        ]


class Stats(TypedDict):
    """What the client measured on one deployment."""

    output_tok_per_s: float
    req_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    requests_per_rank: dict[str, int]
    elapsed_s: float


class Case(Stats):
    """One entry of the report's ``cases``."""

    dp: int


class ServeReport(TypedDict):
    """What ``dpinfer bench serve --json`` prints."""

    model: str
    workload: dict[str, int]
    threads_per_rank: int
    cases: list[Case]
    scaling: float | None
    """Output tokens/s at dp=2 over dp=1 (``None`` unless both ran)."""
    machine: MachineInfo


async def _drive(address: str, workload: Workload, on_done: Callable[[], object]) -> Stats:
    from dpinfer import AsyncInferenceClient, SamplingParams

    ttfts: list[float] = []
    tpots: list[float] = []
    per_rank: collections.Counter[int] = collections.Counter()
    output_tokens = 0
    failures: list[str] = []

    async def one(client: AsyncInferenceClient, prompt: str, output_len: int) -> None:
        nonlocal output_tokens
        params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        first = None
        async for delta in client.add_request_streaming(prompt, params):
            if first is None and delta.token_ids:
                first = time.perf_counter()
            if delta.finished:
                result = delta.result
                assert result is not None
                if not result.ok:
                    failures.append(result.error or result.finish_reason)
                    break
                done = time.perf_counter()
                first = first or done
                ttfts.append(first - started)
                if result.completion_tokens > 1:
                    tpots.append((done - first) / (result.completion_tokens - 1))
                output_tokens += result.completion_tokens
                per_rank[result.rank] += 1
        on_done()

    async with AsyncInferenceClient(address, timeout_s=600.0) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, p, n) for p, n in workload.requests()))
        elapsed = time.perf_counter() - started
    if failures:
        raise click.ClickException(f"{len(failures)} request(s) failed, e.g.: {failures[0]}")
    return {
        "output_tok_per_s": round(output_tokens / elapsed, 1),
        "req_per_s": round(workload.num_requests / elapsed, 2),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1),
        "tpot_p50_ms": round(percentile(tpots, 50) * 1e3, 2),
        "tpot_p99_ms": round(percentile(tpots, 99) * 1e3, 2),
        "requests_per_rank": {str(k): v for k, v in sorted(per_rank.items())},
        "elapsed_s": round(elapsed, 2),
    }


def run_case(
    model: str, dp: int, workload: Workload, engine_args: tuple[str, ...], progress: Progress
) -> Case:
    from dpinfer.config import CoordinatorConfig
    from dpinfer.launcher.deployment import Deployment, ServeConfig

    config = ServeConfig(
        dp=dp,
        coordinator=CoordinatorConfig(port=0),
        engine_args=("--model", model, "--device", "cpu", *engine_args),
        threads_per_rank=1,
    )
    deployment = Deployment(config)
    task = progress.add_task(f"dp={dp}: starting", total=workload.num_requests)
    try:
        address = deployment.start(lambda msg, _s: progress.update(task, description=f"dp={dp}: {msg}"))
        progress.update(task, description=f"dp={dp}: requests")
        case = asyncio.run(_drive(address, workload, lambda: progress.advance(task)))
    finally:
        deployment.stop(drain=False)
    return {"dp": dp, **case}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="tiny-llama", show_default=True, help="Model every rank serves.")
@click.option(
    "--dp",
    "dps",
    multiple=True,
    type=int,
    default=(1, 2),
    show_default=True,
    help="Data-parallel sizes to compare (repeat the flag).",
)
@click.option("--requests", "num_requests", default=Workload.num_requests, show_default=True)
@click.option("--max-running-requests", default=64, show_default=True, help="Per rank.")
@json_option
def command(
    model: str, dps: tuple[int, ...], num_requests: int, max_running_requests: int, as_json: bool
) -> None:
    """The full deployment under a fixed request stream, dp=1 vs dp=2 side by side."""
    from rich.progress import Progress

    workload = Workload(num_requests=num_requests)
    engine_args = ("--max-running-requests", str(max_running_requests), "--kv-cache-bytes", str(256 << 20))
    with Progress(transient=True, disable=as_json) as progress:
        cases = [run_case(model, dp, workload, engine_args, progress) for dp in dps]
    by_dp = {c["dp"]: c for c in cases}
    scaling = (
        round(by_dp[2]["output_tok_per_s"] / by_dp[1]["output_tok_per_s"], 2)
        if 1 in by_dp and 2 in by_dp
        else None
    )
    report = ServeReport(
        model=model,
        workload=workload.__dict__,
        threads_per_rank=1,
        cases=cases,
        scaling=scaling,
        machine=machine_info(),
    )
    columns = [
        Column("dp", "dp", "{}"),
        Column("output_tok_per_s", "output tok/s"),
        Column("req_per_s", "req/s", "{:.2f}"),
        Column("ttft_p50_ms", "TTFT p50 ms"),
        Column("ttft_p99_ms", "TTFT p99 ms"),
        Column("tpot_p50_ms", "TPOT p50 ms", "{:.2f}"),
        Column("tpot_p99_ms", "TPOT p99 ms", "{:.2f}"),
        Column("per_rank", "requests per rank", "{}"),
    ]
    rows = [{**c, "per_rank": " ".join(f"{k}:{v}" for k, v in c["requests_per_rank"].items())} for c in cases]
    notes = [f"scaling (output tok/s, dp=2 over dp=1): {scaling}"] if scaling is not None else []
    emit(report, as_json, lambda _r: [render_table(f"bench serve: {model}", columns, rows)], notes)
