"""The engine benchmark's compute yardstick: model FLOPs of a run against a ``torch`` matmul peak.

*Model FLOPs* count 2 FLOPs per weight of every linear layer per token it computes: the body's
linear layers for every token that runs through the model (each prompt token not served from
the prefix cache, and every generated token but the last of each request, which is never fed
back), the LM head only for generated tokens (one row of logits each). Attention scores,
norms and activations are not counted, so the figure is what the matmuls alone would need.

The *peak* is measured in the same process just before the run and again just after (the
higher rate of the two is kept, so a burst of other work during one reading cannot flatter
the fraction): ``torch.nn.functional.linear`` at each
of the model's weight shapes (its own weights), with 64, 128 and 512 rows, the best of up to
ten runs per shape. ``matmul_peak_fraction`` is the time the run's FLOPs take at those peak rates
(body FLOPs at the body's shapes, head FLOPs at the head's) over the run's wall time: 1.0
would be an engine doing nothing but perfectly efficient matmuls.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    import torch

    from dpinfer.bench.workloads import Case, Workload

PEAK_ROWS = (64, 128, 512)
REPEATS = 10
REPEAT_BUDGET_S = 0.5
"""Per shape and row count: the best of ``REPEATS`` runs, fewer once ``REPEAT_BUDGET_S`` is
spent (noise from other work on the machine only ever lowers a rate, so the best is kept)."""


class MatmulPeak(TypedDict):
    """``torch`` matmul rates at the model's weight shapes (GFLOP/s, the best row count each)."""

    body_gflop_per_s: float
    head_gflop_per_s: float
    body_params: int
    """Weights of the body's linear layers (2 FLOPs each per token)."""
    head_params: int
    """Weights of the LM head (2 FLOPs each per generated token)."""


def _weights(model: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    import torch

    head = model.get_output_embeddings()  # type: ignore[operator]
    assert isinstance(head, torch.nn.Linear)
    body = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return body, head.weight


def _rate(weight: torch.Tensor, rows: int) -> float:
    """Best GFLOP/s of ``linear(x [rows, in], weight [out, in])``."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    cuda = weight.device.type == "cuda"
    best = float("inf")
    with torch.inference_mode():
        F.linear(x, weight)
        if cuda:
            torch.cuda.synchronize(weight.device)
        deadline = time.perf_counter() + REPEAT_BUDGET_S
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            F.linear(x, weight)
            if cuda:
                torch.cuda.synchronize(weight.device)
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
    return 2 * rows * weight.numel() / best / 1e9


def measure_peak(model: torch.nn.Module) -> MatmulPeak:
    """The matmul peak at ``model``'s shapes (a few seconds for a 135M-parameter model)."""
    body, head = _weights(model)
    shapes = Counter(tuple(w.shape) for w in body)
    first: dict[tuple[int, ...], torch.Tensor] = {}
    for w in body:
        first.setdefault(tuple(w.shape), w)
    # FLOP-weighted over the body's shapes: the time one token's body takes at peak.
    seconds_per_token = 0.0
    for shape, count in shapes.items():
        weight = first[shape]
        rate = max(_rate(weight, rows) for rows in PEAK_ROWS)
        seconds_per_token += count * 2 * weight.numel() / (rate * 1e9)
    body_params = sum(w.numel() for w in body)
    return {
        "body_gflop_per_s": round(2 * body_params / seconds_per_token / 1e9, 2),
        "head_gflop_per_s": round(max(_rate(head, rows) for rows in PEAK_ROWS), 2),
        "body_params": body_params,
        "head_params": head.numel(),
    }


def best_of(a: MatmulPeak, b: MatmulPeak) -> MatmulPeak:
    """The higher rate of two measurements of one model (before and after a run)."""
    return {
        **a,
        "body_gflop_per_s": max(a["body_gflop_per_s"], b["body_gflop_per_s"]),
        "head_gflop_per_s": max(a["head_gflop_per_s"], b["head_gflop_per_s"]),
    }


def model_gflop(peak: MatmulPeak, body_tokens: int, generated_tokens: int) -> tuple[float, float]:
    """A run's model GFLOPs, and the seconds they take at the peak rates."""
    body = 2 * peak["body_params"] * body_tokens / 1e9
    head = 2 * peak["head_params"] * generated_tokens / 1e9
    return body + head, body / peak["body_gflop_per_s"] + head / peak["head_gflop_per_s"]


class MatmulReport(MatmulPeak):
    """One in-process ``mixed`` run against the matmul peak."""

    system: str
    model_gflop: float
    model_gflop_per_s: float
    matmul_peak_fraction: float


def peak_seconds(peak: MatmulPeak, workload: Workload, case: Case) -> tuple[float, float]:
    """``case``'s model GFLOPs on ``workload`` and the seconds they take at the peak rates."""
    prompt_tokens = sum(len(p) for p in workload.prompts) - case.get("cached_tokens", 0)
    body_tokens = prompt_tokens + case["output_tokens"] - case["num_requests"]
    return model_gflop(peak, body_tokens, case["output_tokens"])


def compute_figures(peak: MatmulPeak, workload: Workload, case: Case) -> MatmulReport:
    """``case``'s model FLOP rate against the matmul peak."""
    gflop, peak_s = peak_seconds(peak, workload, case)
    return {
        **peak,
        "system": case["system"],
        "model_gflop": round(gflop, 1),
        "model_gflop_per_s": round(gflop / case["duration_s"], 2),
        "matmul_peak_fraction": round(peak_s / case["duration_s"], 3),
    }
