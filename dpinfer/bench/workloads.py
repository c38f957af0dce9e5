"""The engine benchmark's workloads (seeded token-id prompts) and its per-case summary."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from dpinfer.bench.report import percentile

DEFAULT_STEP_TOKENS = 256
"""The benchmark's token budget per step (``--max-prefill-tokens``) on CPU: a step then costs
at most about twice a decode step of the full batch, so streams stay smooth while prompts
are prefilled. A GPU takes far larger steps at the same cost (``dpinfer serve`` uses 2048)."""


@dataclass(frozen=True)
class EngineSetup:
    """How the engine benchmark runs both dpinfer systems (in process and through a rank)."""

    model: str = "tiny-llama"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    step_tokens: int = DEFAULT_STEP_TOKENS
    mixed_steps: bool = True
    max_running_requests: int = 64
    kv_cache_bytes: int = 0
    """The KV pool both systems get (set from the in-process runner's pool, so the rank's is
    the same size)."""


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]


def make_mixed(
    n: int, vocab: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return Workload("mixed", prompts, [rng.randint(*output_range) for _ in range(n)])


def make_shared_prefix(
    n: int,
    vocab: int,
    prefix_len: int,
    suffix_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int,
) -> Workload:
    rng = random.Random(seed + 1)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    prompts = [
        prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*suffix_range))] for _ in range(n)
    ]
    return Workload("shared_prefix", prompts, [rng.randint(*output_range) for _ in range(n)])


class Case(TypedDict):
    """One entry of the engine report's ``cases``: one system on one workload."""

    workload: str
    system: str
    """``dpinfer``, ``dpinfer_logprobs``, ``dpinfer_no_cache``, ``dpinfer_rank`` or ``hf_generate``."""
    num_requests: int
    output_tokens: int
    duration_s: float
    cpu_s: float
    output_tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    tpot_p99_over_p50: float
    """How much slower the slowest streams are than the typical one (1.0: all alike)."""
    cached_tokens: NotRequired[int]
    """In-process Scheduler only: prompt tokens served from the radix cache."""
    retractions: NotRequired[int]
    """In-process Scheduler only: requests retracted for lack of KV slots."""


def summarize(
    workload: Workload, system: str, t0: float, stamps: list[list[float]], end: float, cpu_s: float
) -> Case:
    """One ``cases`` entry from per-request token timestamps (and the CPU seconds it used)."""
    ttft = [(s[0] - t0) * 1e3 for s in stamps if s]
    tpot = [(s[-1] - s[0]) * 1e3 / (len(s) - 1) for s in stamps if len(s) > 1]
    num_tokens = sum(len(s) for s in stamps)
    duration = end - t0
    tpot_p50, tpot_p99 = percentile(tpot, 50), percentile(tpot, 99)
    return {
        "workload": workload.name,
        "system": system,
        "num_requests": len(workload.prompts),
        "output_tokens": num_tokens,
        "duration_s": round(duration, 3),
        "cpu_s": round(cpu_s, 3),
        "output_tok_per_s": round(num_tokens / duration, 1),
        "ttft_p50_ms": round(percentile(ttft, 50), 1),
        "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "tpot_p50_ms": round(tpot_p50, 2),
        "tpot_p99_ms": round(tpot_p99, 2),
        "tpot_p99_over_p50": round(tpot_p99 / tpot_p50, 2) if tpot_p50 > 0 else math.nan,
    }
