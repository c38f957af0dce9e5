"""``dpinfer bench routing``: round_robin vs least_loaded vs cache_aware on one deployment shape.

For each policy, one ``dpinfer serve --dp 2`` deployment of the model (one torch thread per
rank, the KV pool per rank capped by ``--kv-tokens`` so one rank holds about half of the
``shared_prefix`` workload's prefixes) runs every workload of ``routing_workloads`` in
streaming mode at a fixed arrival rate. Between workloads the ranks are suspended and
resumed (paused first), which empties their prefix caches (and, through their reports, the hub's index).

Per case: output tokens/s (all output tokens over first arrival to last final), TTFT p50/p90
(client-measured), the cache hit rate (prompt tokens served from the prefix cache over prompt
tokens looked up, from the ranks' own counters in ``status``, before and after) and how many
requests each rank served. The ratios the issue sets as targets are printed under the table.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, TypedDict

import click

from dpinfer.bench.report import Column, emit, json_option, machine_info, percentile, render_table
from dpinfer.bench.routing_workloads import WORKLOADS, Scale, Session, build

POLICIES = ("round_robin", "least_loaded", "cache_aware")


class Case(TypedDict):
    workload: str
    policy: str
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    cache_hit_rate: float
    requests_per_rank: dict[str, int]
    num_requests: int
    elapsed_s: float


async def _session(client: Any, session: Session, t0: float, output_tokens: int, out: dict[str, Any]) -> None:
    from dpinfer import SamplingParams

    await asyncio.sleep(max(0.0, t0 + session.start_s - time.perf_counter()))
    params = SamplingParams(max_new_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    history: list[dict[str, str]] = [{"role": "system", "content": session.system}] if session.chat else []
    for turn in session.turns:
        prompt: Any = turn
        if session.chat:
            history.append({"role": "user", "content": turn})
            prompt = {"messages": list(history)}
        started = time.perf_counter()
        first = None
        async for delta in client.add_request_streaming(prompt, params):
            if first is None and delta.token_ids:
                first = time.perf_counter()
            if delta.finished:
                result = delta.result
                if not result.ok:
                    out["failures"].append(result.error or result.finish_reason)
                    return
                out["ttfts"].append((first or time.perf_counter()) - started)
                out["tokens"] += result.completion_tokens
                out["per_rank"][result.rank] += 1
                out["last"] = time.perf_counter()
                if session.chat:
                    history.append({"role": "assistant", "content": result.text})


def _cache_counters(status: dict[str, Any]) -> tuple[int, int]:
    hits = queries = 0
    for rank in status["ranks"]:
        hits += rank["metrics"]["prefix_cache_hits"]
        queries += rank["metrics"]["prefix_cache_queries"]
    return hits, queries


async def _run_workload(address: str, name: str, policy: str, scale: Scale) -> Case:
    from dpinfer import AsyncInferenceClient

    sessions = build(name, scale)
    out: dict[str, Any] = {"ttfts": [], "tokens": 0, "per_rank": collections.Counter(), "failures": []}
    async with AsyncInferenceClient(address, timeout_s=600.0) as client:
        await client.pause_engines()
        await client.suspend_engines()  # empties every prefix cache
        await client.resume_engines()
        await client.unpause_engines()
        await asyncio.sleep(0.5)  # the ranks' heartbeats carry fresh counters
        before = _cache_counters(await client.status())
        t0 = time.perf_counter()
        out["last"] = t0
        await asyncio.gather(*(_session(client, s, t0, scale.output_tokens, out) for s in sessions))
        await asyncio.sleep(1.2)  # one more heartbeat: the counters include the last requests
        after = _cache_counters(await client.status())
    if out["failures"]:
        raise click.ClickException(f"{len(out['failures'])} request(s) failed, e.g.: {out['failures'][0]}")
    elapsed = out["last"] - t0
    queries = after[1] - before[1]
    return {
        "workload": name,
        "policy": policy,
        "output_tok_per_s": round(out["tokens"] / elapsed, 1),
        "ttft_p50_ms": round(percentile(out["ttfts"], 50) * 1e3, 1),
        "ttft_p90_ms": round(percentile(out["ttfts"], 90) * 1e3, 1),
        "cache_hit_rate": round((after[0] - before[0]) / queries, 3) if queries else 0.0,
        "requests_per_rank": {str(k): v for k, v in sorted(out["per_rank"].items())},
        "num_requests": len(out["ttfts"]),
        "elapsed_s": round(elapsed, 2),
    }


def run_policy(
    model: str, policy: str, workloads: tuple[str, ...], scale: Scale, engine_args: tuple[str, ...], say: Any
) -> list[Case]:
    from dpinfer.config import CoordinatorConfig, RoutingPolicyName
    from dpinfer.launcher.deployment import Deployment, ServeConfig

    config = ServeConfig(
        dp=2,
        coordinator=CoordinatorConfig(port=0, routing=RoutingPolicyName(policy), deterministic=True),
        engine_args=("--model", model, "--device", "cpu", *engine_args),
        threads_per_rank=1,
    )
    deployment = Deployment(config)
    try:
        address = deployment.start(lambda msg, _s: say(f"{policy}: {msg}"))
        cases = []
        for name in workloads:
            say(f"{policy}: {name}")
            cases.append(asyncio.run(_run_workload(address, name, policy, scale)))
        return cases
    finally:
        deployment.stop(drain=False)


def _ratio(cases: list[Case], workload: str, field: str, over: str) -> float | None:
    by = {(c["workload"], c["policy"]): c for c in cases}
    mine, base = by.get((workload, "cache_aware")), by.get((workload, over))
    if mine is None or base is None or not base[field]:  # type: ignore[literal-required]
        return None
    return round(mine[field] / base[field], 2)  # type: ignore[literal-required]


def targets(cases: list[Case]) -> dict[str, Any]:
    """The issue's targets, as measured in this run."""
    out: dict[str, Any] = {}
    for workload, tok, ttft in (("shared_prefix", 1.5, 0.5), ("multi_turn", 1.3, 0.6)):
        tok_ratio = _ratio(cases, workload, "output_tok_per_s", "round_robin")
        ttft_ratio = _ratio(cases, workload, "ttft_p90_ms", "round_robin")
        met = (tok_ratio is not None and tok_ratio >= tok) or (ttft_ratio is not None and ttft_ratio <= ttft)
        out[workload] = {"tok_per_s_vs_rr": tok_ratio, "ttft_p90_vs_rr": ttft_ratio, "met": met}
    uniform = _ratio(cases, "uniform", "output_tok_per_s", "least_loaded")
    out["uniform"] = {"tok_per_s_vs_ll": uniform, "met": uniform is not None and uniform >= 0.95}
    hot = next((c for c in cases if c["workload"] == "hot_prefix" and c["policy"] == "cache_aware"), None)
    if hot is not None:
        counts = [hot["requests_per_rank"].get(r, 0) for r in ("0", "1")]
        share = round(min(counts) / max(1, sum(counts)), 2)
        out["hot_prefix"] = {"min_rank_share": share, "met": share >= 0.3}
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="tiny-llama", show_default=True, help="Model every rank serves.")
@click.option("--policy", "policies", multiple=True, type=click.Choice(POLICIES), default=POLICIES)
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS), default=WORKLOADS)
@click.option(
    "--scale", default=Scale.scale, show_default=True, help="Fraction of the issue's request counts."
)
@click.option("--rate", default=Scale.rate, show_default=True, help="New sessions per second.")
@click.option("--output-tokens", default=Scale.output_tokens, show_default=True)
@click.option("--kv-tokens", default=6144, show_default=True, help="KV pool tokens per rank.")
@click.option("--max-running-requests", default=16, show_default=True, help="Per rank.")
@json_option
def command(
    model: str,
    policies: tuple[str, ...],
    workloads: tuple[str, ...],
    scale: float,
    rate: float,
    output_tokens: int,
    kv_tokens: int,
    max_running_requests: int,
    as_json: bool,
) -> None:
    """Cache-aware routing vs round-robin and least-loaded, dp=2, four workloads."""
    from rich.console import Console

    console = Console(stderr=True, quiet=as_json)
    knobs = Scale(scale=scale, rate=rate, output_tokens=output_tokens)
    engine_args = ("--max-running-requests", str(max_running_requests), "--max-kv-tokens", str(kv_tokens))
    cases: list[Case] = []
    with console.status("starting") as status:
        for policy in policies:
            cases += run_policy(model, policy, workloads, knobs, engine_args, status.update)
    cases.sort(key=lambda c: (WORKLOADS.index(c["workload"]), POLICIES.index(c["policy"])))
    met = targets(cases)
    report = {
        "model": model,
        "scale": knobs.__dict__,
        "kv_tokens_per_rank": kv_tokens,
        "cases": cases,
        "targets": met,
        "machine": machine_info(),
    }
    columns = [
        Column("workload", "workload", "{}"),
        Column("policy", "policy", "{}"),
        Column("output_tok_per_s", "output tok/s"),
        Column("ttft_p50_ms", "TTFT p50 ms"),
        Column("ttft_p90_ms", "TTFT p90 ms"),
        Column("cache_hit_rate", "cache hit", "{:.2f}"),
        Column("per_rank", "requests per rank", "{}"),
    ]
    rows = [{**c, "per_rank": " ".join(f"{k}:{v}" for k, v in c["requests_per_rank"].items())} for c in cases]
    notes = [f"{name}: {value}" for name, value in met.items()]
    emit(report, as_json, lambda _r: [render_table(f"bench routing: {model}, dp=2", columns, rows)], notes)
