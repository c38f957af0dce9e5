"""Where the in-process engine's time goes: ``dpinfer bench engine --breakdown``.

One more in-process run of ``mixed``, with forward hooks on the model's modules that time
each part exclusively (a part's time leaves out the hooked parts inside it):

- ``linear``: every ``nn.Linear``, the LM head included: the matmuls the model FLOPs count;
- ``attention``: the attention modules less their projections (rotary embeddings, the KV
  write into the pool, decode and prompt attention);
- ``norm``: the RMS/layer norms;
- ``other_forward``: the rest of the forward pass (embeddings, residual adds, activations);
- ``outside_forward``: the rest of the run's wall time (scheduling, sampling, logprobs).

``linear_ceiling`` is the ``matmul_peak_fraction`` this run would reach if everything but its
linear layers took no time: its model FLOPs at the peak rates over its time in linear layers.
``steps`` groups the forward passes by their number of token rows, each with its own
fraction (body FLOPs of its rows, LM-head FLOPs of its logits rows, at the peak rates).

The *roofline* is what this core could do for the same passes at best, running them op by op
as every engine of separate kernels does (``vLLM``'s, ``SGLang``'s, this one): a pass's linear
layers take at least the longer of its model FLOPs at the matmul peak and its weights (body
and LM head, each read once) at the core's streaming read rate, and then its attention at
least its KV bytes at that rate (each request's context read once, the new tokens written).
The rate, ``stream_gb_per_s``, is a one-thread ``torch.sum`` over a buffer larger than any
cache, measured before and after the run, the higher kept. ``roofline_fraction`` is the
roofline's time over the run's wall time; ``matmul_ceiling`` is the ``matmul_peak_fraction`` of
an engine that ran every pass at its roofline (norms, activations and scheduling free). Bytes
are counted as if read from memory, so for a model whose weights stay in cache
(``tiny-llama``) the memory side is overstated and the fraction can pass 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, cast

from dpinfer.bench.matmul_peak import MatmulPeak, model_gflop, peak_seconds
from dpinfer.bench.report import Column, render_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from dpinfer.bench.workloads import Case, Workload
    from dpinfer.runner.attention import ForwardBatch

PARTS = ("linear", "attention", "norm", "other_forward", "outside_forward")
ROW_BUCKETS = ((256, "256+"), (128, "128-255"), (32, "32-127"), (0, "1-31"))


class Part(TypedDict):
    seconds: float
    share: float
    """Of the run's wall time."""


class StepBucket(TypedDict):
    rows: str
    steps: int
    seconds: float
    """Forward time of these steps."""
    linear_s: float
    """Of it, in linear layers."""
    matmul_peak_fraction: float
    roofline_fraction: float
    bound: str
    """``compute`` or ``memory``: what bounds these steps' linear layers, mostly."""


class Breakdown(TypedDict):
    system: str
    duration_s: float
    parts: dict[str, Part]
    linear_ceiling: float
    stream_gb_per_s: float
    roofline_s: float
    roofline_fraction: float
    matmul_ceiling: float
    steps: list[StepBucket]


@dataclass(frozen=True)
class _Pass:
    """One forward pass as the hooks saw it."""

    rows: int
    logits_rows: int
    seconds: float
    linear_s: float
    kv_bytes: int
    """KV its attention must read (every request's context before this pass) and write."""


STREAM_BYTES = 512 << 20
STREAM_REPEATS = 5


def measure_stream_rate() -> float:
    """GB/s of one thread summing a buffer larger than any cache (the best of a few reads)."""
    import torch

    buf = torch.ones(STREAM_BYTES // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(STREAM_REPEATS):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return round(STREAM_BYTES / best / 1e9, 2)


def kv_bytes(batch: ForwardBatch) -> int:
    """The KV bytes ``batch``'s attention cannot avoid: contexts read once, new tokens written."""
    tokens = len(batch.input_ids)  # written
    if batch.kv_lens is not None:
        tokens += int(batch.kv_lens.sum()) - len(batch.kv_lens)
    elif batch.kv_rows is not None:
        tokens += sum(len(r) - 1 for r in batch.kv_rows)
    elif batch.kv_mask is not None:
        tokens += int(batch.kv_mask.sum()) - len(batch.kv_mask)
    tokens += sum(seq.prefix_len for seq in batch.extend_seqs)
    return tokens * batch.kv_pool.layout.bytes_per_token


def _category(module: torch.nn.Module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    name = type(module).__name__
    if name.endswith("Attention"):
        return "attention"
    if "Norm" in name:
        return "norm"
    return None


class _Clock:
    """Exclusive time per part: a stack of ``[start, time of hooked parts inside]``."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.seconds: dict[str, float] = {}
        self.stack: list[list[float]] = []

    def enter(self) -> None:
        self.stack.append([self.now(), 0.0])

    def leave(self, part: str) -> float:
        start, inner = self.stack.pop()
        elapsed = self.now() - start
        self.seconds[part] = self.seconds.get(part, 0.0) + elapsed - inner
        if self.stack:
            self.stack[-1][1] += elapsed
        return elapsed


class _Hooks:
    """Timing hooks on ``model`` (removed by ``remove``); one record per forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.clock = _Clock()
        self.passes: list[_Pass] = []
        self._rows = self._kv_bytes = 0
        self._linear_before = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._model_enter, with_kwargs=True),
            model.register_forward_hook(self._model_leave),
        ]
        for module in model.modules():
            part = _category(module)
            if part is not None and module is not model:
                self._handles.append(module.register_forward_pre_hook(lambda *_: self.clock.enter()))
                self._handles.append(module.register_forward_hook(self._leaver(part)))

    def _leaver(self, part: str) -> Callable[..., None]:
        def leave(*_: object) -> None:
            self.clock.leave(part)

        return leave

    def _model_enter(self, _module: object, args: object, kwargs: dict[str, object]) -> None:
        batch = cast("ForwardBatch", kwargs["dp_batch"])
        self._rows = len(batch.input_ids)
        self._kv_bytes = kv_bytes(batch)
        self._linear_before = self.clock.seconds.get("linear", 0.0)
        self.clock.enter()

    def _model_leave(self, _module: object, _args: object, output: object) -> None:
        elapsed = self.clock.leave("other_forward")
        logits = getattr(output, "logits", None)
        linear_s = self.clock.seconds.get("linear", 0.0) - self._linear_before
        self.passes.append(
            _Pass(
                self._rows,
                int(logits.shape[-2]) if logits is not None else 0,
                elapsed,
                linear_s,
                self._kv_bytes,
            )
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(
    model: torch.nn.Module, peak: MatmulPeak, workload: Workload, run: Callable[[], Case]
) -> Breakdown:
    """Run ``run`` (one in-process pass over ``workload``) with the hooks on ``model``."""
    stream = measure_stream_rate()
    hooks = _Hooks(model)
    try:
        case = run()
    finally:
        hooks.remove()
    stream = max(stream, measure_stream_rate())
    wall = case["duration_s"]
    seconds = dict(hooks.clock.seconds)
    seconds["outside_forward"] = wall - sum(p.seconds for p in hooks.passes)
    _, at_peak = peak_seconds(peak, workload, case)
    # every linear weight: the body's and the LM head's (the ones the peak was measured on)
    weights = (peak["body_params"] + peak["head_params"]) * next(model.parameters()).element_size()
    roof = _Roofline(peak, stream, weights)
    roofline_s = sum(roof.bound(p)[0] for p in hooks.passes)
    return {
        "system": case["system"],
        "duration_s": wall,
        "parts": {
            p: {"seconds": round(seconds.get(p, 0.0), 2), "share": round(seconds.get(p, 0.0) / wall, 3)}
            for p in PARTS
        },
        "linear_ceiling": round(at_peak / max(seconds.get("linear", 0.0), 1e-9), 3),
        "stream_gb_per_s": stream,
        "roofline_s": round(roofline_s, 2),
        "roofline_fraction": round(roofline_s / wall, 3),
        "matmul_ceiling": round(at_peak / max(roofline_s, 1e-9), 3),
        "steps": _buckets(roof, hooks.passes),
    }


@dataclass(frozen=True)
class _Roofline:
    peak: MatmulPeak
    stream_gb_per_s: float
    weight_bytes: int

    def bound(self, one: _Pass) -> tuple[float, str]:
        """The least time ``one`` takes op by op here, and what bounds its linear layers."""
        _, compute = model_gflop(self.peak, one.rows, one.logits_rows)
        weights = self.weight_bytes / (self.stream_gb_per_s * 1e9)
        attention = one.kv_bytes / (self.stream_gb_per_s * 1e9)
        side = "compute" if compute >= weights else "memory"
        return max(compute, weights) + attention, side


def _buckets(roof: _Roofline, passes: list[_Pass]) -> list[StepBucket]:
    groups: dict[str, list[_Pass]] = {label: [] for _, label in ROW_BUCKETS}
    for one in passes:  # the first bucket, from the largest down, whose floor it reaches
        groups[next(label for low, label in ROW_BUCKETS if one.rows >= low)].append(one)
    out: list[StepBucket] = []
    for label, mine in groups.items():
        if not mine:
            continue
        seconds = sum(p.seconds for p in mine)
        _, at_peak = model_gflop(roof.peak, sum(p.rows for p in mine), sum(p.logits_rows for p in mine))
        bounds = [roof.bound(p) for p in mine]
        memory_s = sum(b for b, side in bounds if side == "memory")
        roofline_s = sum(b for b, _ in bounds)
        out.append(
            {
                "rows": label,
                "steps": len(mine),
                "seconds": round(seconds, 2),
                "linear_s": round(sum(p.linear_s for p in mine), 2),
                "matmul_peak_fraction": round(at_peak / seconds, 3),
                "roofline_fraction": round(roofline_s / seconds, 3),
                # the side that bounds most of these steps' roofline time
                "bound": "memory" if memory_s > roofline_s / 2 else "compute",
            }
        )
    return out


PART_COLUMNS = [
    Column("part", "part"),
    Column("seconds", "seconds", "{:.2f}"),
    Column("share", "share of wall", "{:.1%}"),
]
STEP_COLUMNS = [
    Column("rows", "token rows per step"),
    Column("steps", "steps", "{:,}"),
    Column("seconds", "forward s", "{:.2f}"),
    Column("linear_s", "linear s", "{:.2f}"),
    Column("matmul_peak_fraction", "matmul peak fraction", "{:.2f}"),
    Column("roofline_fraction", "roofline fraction", "{:.2f}"),
    Column("bound", "linear bound by"),
]


def tables(breakdown: Breakdown) -> list[Table]:
    title = (
        f"where the time goes: {breakdown['system']} on mixed, {breakdown['duration_s']:.1f} s "
        f"(linear-only ceiling {breakdown['linear_ceiling']:.2f})"
    )
    roof = (
        f"forward passes by size (roofline {breakdown['roofline_s']:.1f} s at "
        f"{breakdown['stream_gb_per_s']:.1f} GB/s: {breakdown['roofline_fraction']:.2f} of it reached, "
        f"matmul ceiling {breakdown['matmul_ceiling']:.2f})"
    )
    parts = [{"part": name, **part} for name, part in breakdown["parts"].items()]
    return [
        render_table(title, PART_COLUMNS, parts),
        render_table(roof, STEP_COLUMNS, [*breakdown["steps"]]),
    ]
