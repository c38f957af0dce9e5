"""``dpinfer bench engine``: one rank's engine against ``transformers`` ``generate``.

The Scheduler and ``generate`` run in this process on the same model with the same number of
torch threads; ``mixed`` also runs through a real rank stack (``engine_stack.py``, system
``dpinfer_rank``) so the cost of the rank's processes shows beside the in-process figure.
Workloads (fixed seed, random token ids, greedy, ``ignore_eos`` so output lengths hold):

- ``mixed``: prompts of 16-512 tokens, outputs of 8-256; the baseline is ``generate`` on
  static, left-padded batches of 16 (each batch runs until its longest output).
- ``shared_prefix``: every prompt is one 400-token prefix plus a short suffix; the
  Scheduler with its radix cache on against the same with it off.

``mixed`` runs the Scheduler a second time with ``logprobs=5`` on every request (system
``dpinfer_logprobs``): ``speedup.logprobs`` is its throughput over the run without
(``logprobs_cpu``: the same in CPU seconds, which other load on the machine disturbs less).

The Scheduler gets every request at t=0 and each output token is timestamped when the step
that produced it returns; ``generate`` tokens are timestamped by a logits processor at the
step that produced them. TTFT counts from t=0 (queueing included), TPOT is
``(last - first) / (n - 1)`` per request; ``tpot_p99_over_p50`` shows how much the slowest
streams stall (prefills that stop the running streams make it large).

Both dpinfer systems run with ``--step-tokens`` as the token budget of one step (decodes
first, then prompt chunks; ``--no-mixed-steps`` alternates prefill-only and decode-only
steps instead). On ``mixed`` the report adds ``matmul``/``matmul_peak_fraction``: the
in-process run's model FLOP rate over a ``torch`` matmul peak at the model's shapes,
measured in the same run (``matmul_peak.py``); it means something on a model whose steps
are matmul-bound (``--model smollm2-135m``), not on tiny-llama, whose are framework overhead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NotRequired, TypedDict

import click

from dpinfer.bench import engine_breakdown
from dpinfer.bench.hf_baseline import HFGenerator, run_hf_generate
from dpinfer.bench.matmul_peak import MatmulReport, best_of, compute_figures, measure_peak
from dpinfer.bench.report import Column, MachineInfo, emit, json_option, machine_info, render_table
from dpinfer.bench.workloads import (
    DEFAULT_STEP_TOKENS,
    Case,
    EngineSetup,
    Workload,
    make_mixed,
    make_shared_prefix,
    summarize,
)

if TYPE_CHECKING:
    from rich.table import Table

    from dpinfer.runner.model_runner import ModelRunner

TARGETS = {
    "mixed": 2.0,
    "mixed_through_rank": 3.0,
    "shared_prefix": 1.5,
    "tpot_p99_over_p50_max": 2.0,
    "matmul_peak_fraction": 0.7,
    "logprobs": 0.9,
}
LOGPROBS_K = 5
"""``logprobs`` of every request of the ``dpinfer_logprobs`` case."""


class Sizes(TypedDict):
    """The workloads' length options: ranges are ``(low, high)``, inclusive."""

    prompt: tuple[int, int]
    output: tuple[int, int]
    prefix: int
    suffix: tuple[int, int]
    shared_output: tuple[int, int]


class EngineReport(TypedDict):
    """What ``dpinfer bench engine --json`` prints."""

    bench: str
    model: str
    device: str
    dtype: str
    torch_threads: int
    step_tokens: int
    mixed_steps: bool
    decode_attention: str
    """How decode attention ran: ``kernel`` (the C kernel), ``ragged`` (torch, per request) or
    ``padded`` (GPU)."""
    machine: MachineInfo
    cases: list[Case]
    speedup: dict[str, float]
    """Per workload: output tok/s of dpinfer over its baseline."""
    targets: dict[str, float]
    """``speedup`` minimums, the most a case's ``tpot_p99_over_p50`` should be, and the
    least ``matmul_peak_fraction`` should be (on smollm2-135m)."""
    matmul: NotRequired[MatmulReport]
    matmul_peak_fraction: NotRequired[float]
    breakdown: NotRequired[engine_breakdown.Breakdown]
    """``--breakdown``: where one more in-process ``mixed`` run spent its time."""


def run_dpinfer(
    runner: ModelRunner,
    workload: Workload,
    radix: bool,
    system: str,
    setup: EngineSetup,
    logprobs: int | None = None,
) -> Case:
    from dpinfer.config import SchedulerConfig
    from dpinfer.protocol.local import TokenizedRequest
    from dpinfer.sampling import SamplingParams
    from dpinfer.scheduler.scheduler import Scheduler

    config = SchedulerConfig(
        max_running_requests=setup.max_running_requests,
        max_prefill_tokens=setup.step_tokens,
        enable_radix_cache=radix,
        mixed_steps=setup.mixed_steps,
    )
    scheduler = Scheduler(runner, config)
    stamps: list[list[float]] = [[] for _ in workload.prompts]
    cached = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        params = SamplingParams(max_new_tokens=out_len, temperature=0.0, ignore_eos=True, logprobs=logprobs)
        errors = scheduler.add_request(TokenizedRequest(i, prompt, params, stream=True))
        if errors:
            raise click.ClickException(f"request {i} rejected: {errors[0].error}")
    done = 0
    while done < len(workload.prompts):
        outputs = scheduler.step()
        now = time.perf_counter()
        for out in outputs:
            stamps[out.request_id].extend([now] * len(out.new_token_ids))
            if out.finished:
                done += 1
                cached += out.cached_len
                if out.finish_reason != "length":
                    raise click.ClickException(f"request {out.request_id} ended with {out.finish_reason}")
    case = summarize(workload, system, t0, stamps, time.perf_counter(), time.process_time() - cpu0)
    case["cached_tokens"] = cached
    case["retractions"] = scheduler.num_retractions
    return case


def warm_up(runner: ModelRunner, model: HFGenerator, setup: EngineSetup) -> None:
    """One short request through each system, so allocation and lazy init are not timed."""
    warm = Workload("warmup", [list(range(3, 40)), list(range(5, 20))], [4, 4])
    run_dpinfer(runner, warm, radix=True, system="warmup", setup=setup)
    run_hf_generate(model, warm, pad_id=0, device=setup.device)


def run_bench(
    setup: EngineSetup,
    workloads: list[str],
    num_requests: int,
    sizes: Sizes,
    seed: int,
    through_rank: bool = True,
    breakdown: bool = False,
) -> EngineReport:
    import torch
    from transformers import AutoModelForCausalLM

    from dpinfer.config import ModelConfig, SchedulerConfig
    from dpinfer.runner.model_runner import ModelRunner

    torch.set_num_threads(setup.threads)
    model_config = ModelConfig(model=setup.model, device=setup.device, dtype=setup.dtype)
    # A pool for every request of the workload at its longest, the same size in the rank.
    longest = max(
        sizes["prompt"][1] + sizes["output"][1],
        sizes["prefix"] + sizes["suffix"][1] + sizes["shared_output"][1],
    )
    kv_tokens = setup.max_running_requests * longest
    # Prefaulted (in the rank too): the timed runs see a warm pool, as a server does after its
    # first minutes, not one whose pages are mapped inside the first case's steps.
    pool = SchedulerConfig(
        max_running_requests=setup.max_running_requests,
        max_kv_tokens=kv_tokens,
        kv_cache_fraction=0.5,
        kv_prefault=True,
    )
    runner = ModelRunner(model_config, pool)
    setup = dataclasses.replace(setup, kv_cache_bytes=runner.num_slots * runner.layout.bytes_per_token)
    model = AutoModelForCausalLM.from_pretrained(runner.spec.path, dtype=getattr(torch, setup.dtype)).eval()
    model.to(setup.device)
    pad_id = model.generation_config.pad_token_id or 0
    vocab = runner.vocab_size
    warm_up(runner, model, setup)
    cases: list[Case] = []
    speedup: dict[str, float] = {}
    report: EngineReport = {
        "bench": "engine",
        "model": setup.model,
        "device": setup.device,
        "dtype": setup.dtype,
        "torch_threads": setup.threads,
        "step_tokens": setup.step_tokens,
        "mixed_steps": setup.mixed_steps,
        "decode_attention": runner.decode_layout.value,
        "machine": machine_info(),
        "cases": cases,
        "speedup": speedup,
        "targets": dict(TARGETS),
    }
    if "mixed" in workloads:
        peak = measure_peak(runner.model)
        wl = make_mixed(num_requests, vocab, sizes["prompt"], sizes["output"], seed)
        ours = run_dpinfer(runner, wl, radix=True, system="dpinfer", setup=setup)
        base = run_hf_generate(model, wl, pad_id, setup.device)
        cases += [ours, base]
        speedup["mixed"] = round(ours["output_tok_per_s"] / base["output_tok_per_s"], 2)
        peak = best_of(peak, measure_peak(runner.model))
        report["matmul"] = compute_figures(peak, wl, ours)
        report["matmul_peak_fraction"] = report["matmul"]["matmul_peak_fraction"]
        if breakdown:
            report["breakdown"] = engine_breakdown.measure(
                runner.model, peak, wl, lambda: run_dpinfer(runner, wl, True, "dpinfer", setup)
            )
        with_logprobs = run_dpinfer(
            runner, wl, radix=True, system="dpinfer_logprobs", setup=setup, logprobs=LOGPROBS_K
        )
        cases.append(with_logprobs)
        speedup["logprobs"] = round(with_logprobs["output_tok_per_s"] / ours["output_tok_per_s"], 2)
        # The same ratio in CPU seconds, steadier than wall time on a shared machine (one thread).
        speedup["logprobs_cpu"] = round(ours["cpu_s"] / max(with_logprobs["cpu_s"], 1e-9), 2)
        if through_rank:
            from dpinfer.bench.engine_stack import run_rank_stack

            stack = run_rank_stack(setup, wl)
            cases.append(stack)
            speedup["mixed_through_rank"] = round(stack["output_tok_per_s"] / base["output_tok_per_s"], 2)
    if "shared_prefix" in workloads:
        wl = make_shared_prefix(
            num_requests, vocab, sizes["prefix"], sizes["suffix"], sizes["shared_output"], seed
        )
        ours = run_dpinfer(runner, wl, radix=True, system="dpinfer", setup=setup)
        base = run_dpinfer(runner, wl, radix=False, system="dpinfer_no_cache", setup=setup)
        cases += [ours, base]
        speedup["shared_prefix"] = round(ours["output_tok_per_s"] / base["output_tok_per_s"], 2)
    return report


COLUMNS = [
    Column("workload", "workload"),
    Column("system", "system"),
    Column("output_tokens", "out tokens", "{:,}"),
    Column("duration_s", "time s", "{:.2f}"),
    Column("cpu_s", "cpu s", "{:.2f}"),
    Column("output_tok_per_s", "out tok/s"),
    Column("ttft_p50_ms", "TTFT p50 ms"),
    Column("ttft_p99_ms", "TTFT p99 ms"),
    Column("tpot_p50_ms", "TPOT p50 ms", "{:.2f}"),
    Column("tpot_p99_ms", "TPOT p99 ms", "{:.2f}"),
    Column("tpot_p99_over_p50", "p99/p50", "{:.2f}"),
]


def _tables(report: EngineReport) -> list[Table]:
    title = (
        f"engine: {report['model']}, {report['device']} {report['dtype']}, "
        f"{report['torch_threads']} torch threads, {report['step_tokens']} tokens per step, "
        f"decode attention: {report['decode_attention']}"
    )
    rows: list[Mapping[str, object]] = [*report["cases"]]
    rows += [
        {"workload": k, "system": "speedup", "output_tok_per_s": v} for k, v in report["speedup"].items()
    ]
    tables = [render_table(title, COLUMNS, rows)]
    if "breakdown" in report:
        tables += engine_breakdown.tables(report["breakdown"])
    return tables


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a range like 16-512") from None
    if not 0 < low <= high:
        raise click.BadParameter(f"{text!r}: need 0 < low <= high")
    return low, high


@click.command("engine")
@click.option(
    "--model", default="tiny-llama", show_default=True, help="Built-in model name or local HF directory."
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="torch threads, the same for both systems (1 is steadiest on a shared machine).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (both systems).")
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16", "float16"]),
    help="Model dtype (both systems).",
)
@click.option(
    "--step-tokens",
    default=DEFAULT_STEP_TOKENS,
    show_default=True,
    type=click.IntRange(min=1),
    help="dpinfer's token budget of one step (--max-prefill-tokens).",
)
@click.option(
    "--mixed-steps/--no-mixed-steps",
    default=True,
    show_default=True,
    help="dpinfer runs decodes and prompt chunks in one pass (off: alternating steps).",
)
@click.option(
    "--workload",
    "workloads",
    multiple=True,
    type=click.Choice(["mixed", "shared_prefix"]),
    help="Workloads to run (default: both).",
)
@click.option(
    "--num-requests", default=64, show_default=True, type=click.IntRange(min=1), help="Requests per workload."
)
@click.option("--prompt-len", default="16-512", show_default=True, help="mixed: prompt length range.")
@click.option("--output-len", default="8-256", show_default=True, help="mixed: output length range.")
@click.option("--prefix-len", default=400, show_default=True, help="shared_prefix: shared prefix length.")
@click.option("--suffix-len", default="16-64", show_default=True, help="shared_prefix: suffix length range.")
@click.option(
    "--shared-output-len", default="8-64", show_default=True, help="shared_prefix: output length range."
)
@click.option("--seed", default=0, show_default=True, help="Workload seed.")
@click.option(
    "--through-rank/--no-through-rank",
    default=True,
    show_default=True,
    help="Also run mixed through a real rank stack (coordinator + rank processes).",
)
@click.option(
    "--breakdown", is_flag=True, help="One more in-process mixed run, timing linear, attention and the rest."
)
@json_option
def command(
    model: str,
    threads: int,
    device: str,
    dtype: str,
    step_tokens: int,
    mixed_steps: bool,
    workloads: tuple[str, ...],
    num_requests: int,
    prompt_len: str,
    output_len: str,
    prefix_len: int,
    suffix_len: str,
    shared_output_len: str,
    seed: int,
    through_rank: bool,
    breakdown: bool,
    as_json: bool,
) -> None:
    """The in-process Scheduler against transformers generate (static batches of 16)."""
    sizes = Sizes(
        prompt=_range(prompt_len),
        output=_range(output_len),
        prefix=prefix_len,
        suffix=_range(suffix_len),
        shared_output=_range(shared_output_len),
    )
    setup = EngineSetup(model, device, dtype, threads, step_tokens, mixed_steps)
    chosen = list(workloads or ("mixed", "shared_prefix"))
    report = run_bench(setup, chosen, num_requests, sizes, seed, through_rank, breakdown)
    notes = [
        f"Both systems in one process, {threads} torch threads each; greedy, ignore_eos.",
        "speedup: mixed = dpinfer / hf_generate, shared_prefix = dpinfer / dpinfer_no_cache, "
        "logprobs = dpinfer_logprobs / dpinfer (output tok/s).",
        "dpinfer_rank: mixed through a real rank stack (tokenizer, scheduler, detokenizer processes).",
    ]
    if "matmul" in report:
        mm = report["matmul"]
        notes.append(
            f"matmul_peak_fraction {mm['matmul_peak_fraction']}: {mm['model_gflop_per_s']} model GFLOP/s "
            f"({mm['system']}) over a torch matmul peak of {mm['body_gflop_per_s']} (body) / "
            f"{mm['head_gflop_per_s']} (LM head) GFLOP/s at the model's shapes."
        )
    emit(report, as_json, _tables, notes)
