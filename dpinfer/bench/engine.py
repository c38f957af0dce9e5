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
``(last - first) / (n - 1)`` per request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypedDict

import click

from dpinfer.bench.report import Column, MachineInfo, emit, json_option, machine_info, render_table
from dpinfer.bench.workloads import Case, Workload, make_mixed, make_shared_prefix, summarize

if TYPE_CHECKING:
    from rich.table import Table

    from dpinfer.runner.model_runner import ModelRunner

HF_BATCH_SIZE = 16
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
    machine: MachineInfo
    cases: list[Case]
    speedup: dict[str, float]
    """Per workload: output tok/s of dpinfer over its baseline."""
    targets: dict[str, float]


class HFGenerator(Protocol):
    """What the baseline calls on a ``transformers`` causal LM (``AutoModelForCausalLM``)."""

    def generate(self, **kwargs: object) -> object: ...


def run_dpinfer(
    runner: ModelRunner, workload: Workload, radix: bool, system: str, logprobs: int | None = None
) -> Case:
    from dpinfer.config import SchedulerConfig
    from dpinfer.protocol.local import TokenizedRequest
    from dpinfer.sampling import SamplingParams
    from dpinfer.scheduler.scheduler import Scheduler

    config = SchedulerConfig(max_running_requests=64, max_prefill_tokens=2048, enable_radix_cache=radix)
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


def run_hf_generate(model: HFGenerator, workload: Workload, pad_id: int) -> Case:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    stamps: list[list[float]] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(workload.prompts), HF_BATCH_SIZE):
        prompts = workload.prompts[start : start + HF_BATCH_SIZE]
        out_lens = workload.output_lens[start : start + HF_BATCH_SIZE]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = StepClock()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(out_lens),
                min_new_tokens=max(out_lens),  # no EOS: every request runs its full length
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        stamps.extend(clock.times[:n] for n in out_lens)
    return summarize(workload, "hf_generate", t0, stamps, time.perf_counter(), time.process_time() - cpu0)


def warm_up(runner: ModelRunner, model: HFGenerator) -> None:
    """One short request through each system, so allocation and lazy init are not timed."""
    warm = Workload("warmup", [list(range(3, 40)), list(range(5, 20))], [4, 4])
    run_dpinfer(runner, warm, radix=True, system="warmup")
    run_hf_generate(model, warm, pad_id=0)


def run_bench(
    model_name: str,
    threads: int,
    workloads: list[str],
    num_requests: int,
    sizes: Sizes,
    seed: int,
    through_rank: bool = True,
) -> EngineReport:
    import torch
    from transformers import AutoModelForCausalLM

    from dpinfer.config import ModelConfig, SchedulerConfig
    from dpinfer.runner.model_runner import ModelRunner

    torch.set_num_threads(threads)
    runner = ModelRunner(ModelConfig(model=model_name), SchedulerConfig(max_running_requests=64))
    model = AutoModelForCausalLM.from_pretrained(runner.spec.path, dtype=torch.float32).eval()
    pad_id = model.generation_config.pad_token_id or 0
    vocab = runner.vocab_size
    warm_up(runner, model)
    cases: list[Case] = []
    speedup: dict[str, float] = {}
    if "mixed" in workloads:
        wl = make_mixed(num_requests, vocab, sizes["prompt"], sizes["output"], seed)
        ours, base = run_dpinfer(runner, wl, radix=True, system="dpinfer"), run_hf_generate(model, wl, pad_id)
        cases += [ours, base]
        speedup["mixed"] = round(ours["output_tok_per_s"] / base["output_tok_per_s"], 2)
        with_logprobs = run_dpinfer(runner, wl, radix=True, system="dpinfer_logprobs", logprobs=LOGPROBS_K)
        cases.append(with_logprobs)
        speedup["logprobs"] = round(with_logprobs["output_tok_per_s"] / ours["output_tok_per_s"], 2)
        # The same ratio in CPU seconds, steadier than wall time on a shared machine (one thread).
        speedup["logprobs_cpu"] = round(ours["cpu_s"] / max(with_logprobs["cpu_s"], 1e-9), 2)
        if through_rank:
            from dpinfer.bench.engine_stack import run_rank_stack

            stack = run_rank_stack(model_name, threads, wl)
            cases.append(stack)
            speedup["mixed_through_rank"] = round(stack["output_tok_per_s"] / base["output_tok_per_s"], 2)
    if "shared_prefix" in workloads:
        wl = make_shared_prefix(
            num_requests, vocab, sizes["prefix"], sizes["suffix"], sizes["shared_output"], seed
        )
        ours = run_dpinfer(runner, wl, radix=True, system="dpinfer")
        base = run_dpinfer(runner, wl, radix=False, system="dpinfer_no_cache")
        cases += [ours, base]
        speedup["shared_prefix"] = round(ours["output_tok_per_s"] / base["output_tok_per_s"], 2)
    return {
        "bench": "engine",
        "model": model_name,
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": threads,
        "machine": machine_info(),
        "cases": cases,
        "speedup": speedup,
        "targets": {"mixed": 2.0, "shared_prefix": 1.5, "logprobs": 0.9},
    }


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
]


def _tables(report: EngineReport) -> list[Table]:
    title = f"engine: {report['model']}, cpu fp32, {report['torch_threads']} torch threads"
    rows: list[Mapping[str, object]] = [*report["cases"]]
    rows += [
        {"workload": k, "system": "speedup", "output_tok_per_s": v} for k, v in report["speedup"].items()
    ]
    return [render_table(title, COLUMNS, rows)]


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
@json_option
def command(
    model: str,
    threads: int,
    workloads: tuple[str, ...],
    num_requests: int,
    prompt_len: str,
    output_len: str,
    prefix_len: int,
    suffix_len: str,
    shared_output_len: str,
    seed: int,
    through_rank: bool,
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
    report = run_bench(
        model, threads, list(workloads or ("mixed", "shared_prefix")), num_requests, sizes, seed, through_rank
    )
    notes = [
        f"Both systems in one process, {threads} torch threads each; greedy, ignore_eos.",
        "speedup: mixed = dpinfer / hf_generate, shared_prefix = dpinfer / dpinfer_no_cache, "
        "logprobs = dpinfer_logprobs / dpinfer (output tok/s).",
        "dpinfer_rank: mixed through a real rank stack (tokenizer, scheduler, detokenizer processes).",
    ]
    emit(report, as_json, _tables, notes)
