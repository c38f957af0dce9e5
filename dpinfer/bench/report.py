"""Shared helpers for benchmark reports: percentiles, CPU clocks, a rich table, ``--json`` output.

Every ``dpinfer bench ...`` command builds one JSON-ready ``dict`` (its report; the command's
module may spell out its keys as a ``TypedDict``) and hands it to ``emit``, which prints
either that dict as JSON (``--json``) or rich tables plus notes.
Latencies are kept in seconds while measuring and reported in microseconds or milliseconds
with the unit in the key (``p50_us``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import JustifyMethod

ReportT = TypeVar("ReportT", bound=Mapping[str, object])
F = TypeVar("F", bound=Callable[..., object])

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary_us(latencies_s: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50_us": ..., "p99_us": ..., "mean_us": ...}`` from latencies in seconds."""
    out = {f"p{q:g}_us": round(percentile(latencies_s, q) * 1e6, 1) for q in qs}
    out["mean_us"] = round(sum(latencies_s) / len(latencies_s) * 1e6, 1) if latencies_s else math.nan
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) used so far by process ``pid``.

    Sums ``/proc/<pid>/task/*/schedstat`` (nanosecond run times) when the kernel offers it;
    falls back to ``utime + stime`` from ``/proc/<pid>/stat`` (clock-tick resolution).
    """
    task_dir = f"/proc/{pid}/task"
    try:
        total_ns = 0
        for tid in os.listdir(task_dir):
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        return total_ns / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; fields after its closing paren are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class MachineInfo(TypedDict):
    """The report's ``machine`` key."""

    cpus: int | None
    load_avg_1m: float | None
    python: str
    platform: str


def machine_info() -> MachineInfo:
    """What the numbers were measured on (for the report's ``machine`` key)."""
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


@dataclass(frozen=True)
class Column:
    """One table column: the report key, its header, and how to format a value."""

    key: str
    header: str
    fmt: str = "{:,.1f}"
    justify: JustifyMethod = "right"

    def format(self, value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, str):
            return value
        return self.fmt.format(value)


def render_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, object]]) -> Table:
    """A ``rich.table.Table`` of ``rows`` (dicts keyed by ``Column.key``)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col.header, justify=col.justify)
    for row in rows:
        table.add_row(*(col.format(row.get(col.key)) for col in columns))
    return table


def emit(
    report: ReportT,
    as_json: bool,
    tables: Callable[[ReportT], Sequence[RenderableType]],
    notes: Sequence[str] = (),
) -> None:
    """Print ``report`` as JSON (``--json``) or as the rich tables ``tables(report)`` returns, then notes."""
    if as_json:
        click.echo(json.dumps(_clean(report), indent=2, allow_nan=False))
        return
    from rich.console import Console

    # Reports often go to a file or CI log: do not squeeze tables to the 80 columns rich assumes there.
    console = Console(width=None if sys.stdout.isatty() else 120)
    for table in tables(report):
        console.print(table)
    for note in notes:
        console.print(f"[dim]{note}[/dim]")


def json_option(func: F) -> F:
    """The ``--json`` flag every benchmark takes."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")(
        func
    )


def _clean(value: object) -> object:
    """``value`` with NaN/inf turned into ``None`` (strict JSON) and arrays into lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value
