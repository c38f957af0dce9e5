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

The hooks cost a few microseconds per module call (some hundreds per step), so this run is
slightly slower than the timed ones: its shares are the result, not its speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from dpinfer.bench.matmul_peak import MatmulPeak, model_gflop, peak_seconds
from dpinfer.bench.report import Column, render_table

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from dpinfer.bench.workloads import Case, Workload

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
    matmul_peak_fraction: float


class Breakdown(TypedDict):
    system: str
    duration_s: float
    parts: dict[str, Part]
    linear_ceiling: float
    steps: list[StepBucket]


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
        self.passes: list[tuple[int, int, float]] = []
        """Per forward pass: token rows, logits rows, seconds."""
        self._rows = 0
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

    def _model_enter(self, _module: object, args: object, kwargs: dict[str, torch.Tensor]) -> None:
        ids = kwargs.get("input_ids")
        self._rows = int(ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[-2])
        self.clock.enter()

    def _model_leave(self, _module: object, _args: object, output: object) -> None:
        elapsed = self.clock.leave("other_forward")
        logits = getattr(output, "logits", None)
        self.passes.append((self._rows, int(logits.shape[-2]) if logits is not None else 0, elapsed))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(
    model: torch.nn.Module, peak: MatmulPeak, workload: Workload, run: Callable[[], Case]
) -> Breakdown:
    """Run ``run`` (one in-process pass over ``workload``) with the hooks on ``model``."""
    hooks = _Hooks(model)
    try:
        case = run()
    finally:
        hooks.remove()
    wall = case["duration_s"]
    seconds = dict(hooks.clock.seconds)
    seconds["outside_forward"] = wall - sum(p[2] for p in hooks.passes)
    _, at_peak = peak_seconds(peak, workload, case)
    return {
        "system": case["system"],
        "duration_s": wall,
        "parts": {
            p: {"seconds": round(seconds.get(p, 0.0), 2), "share": round(seconds.get(p, 0.0) / wall, 3)}
            for p in PARTS
        },
        "linear_ceiling": round(at_peak / max(seconds.get("linear", 0.0), 1e-9), 3),
        "steps": _buckets(peak, hooks.passes),
    }


def _buckets(peak: MatmulPeak, passes: list[tuple[int, int, float]]) -> list[StepBucket]:
    groups: dict[str, list[tuple[int, int, float]]] = {label: [] for _, label in ROW_BUCKETS}
    for one in passes:  # the first bucket, from the largest down, whose floor it reaches
        groups[next(label for low, label in ROW_BUCKETS if one[0] >= low)].append(one)
    out: list[StepBucket] = []
    for label, mine in groups.items():
        if not mine:
            continue
        seconds = sum(p[2] for p in mine)
        _, at_peak = model_gflop(peak, sum(p[0] for p in mine), sum(p[1] for p in mine))
        out.append(
            {
                "rows": label,
                "steps": len(mine),
                "seconds": round(seconds, 2),
                "matmul_peak_fraction": round(at_peak / seconds, 3),
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
    Column("matmul_peak_fraction", "matmul peak fraction", "{:.2f}"),
]


def tables(breakdown: Breakdown) -> list[Table]:
    title = (
        f"where the time goes: {breakdown['system']} on mixed, {breakdown['duration_s']:.1f} s "
        f"(linear-only ceiling {breakdown['linear_ceiling']:.2f})"
    )
    parts = [{"part": name, **part} for name, part in breakdown["parts"].items()]
    return [
        render_table(title, PART_COLUMNS, parts),
        render_table("forward passes by size", STEP_COLUMNS, [*breakdown["steps"]]),
    ]
