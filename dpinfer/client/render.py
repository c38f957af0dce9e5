"""Rich tables and JSON shapes for the client-side CLI commands (status, control acks, results).

Only plain data goes in (status maps, ``ControlAcknowledgement``, ``GenerationResult``). The
status table shows the rank fields an operator scans for (those the coordinator reports), as
many as fit the terminal, most important first; everything else is in ``--json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rich.table import Table

from dpinfer.client.session import ControlAcknowledgement
from dpinfer.outputs import GenerationResult

# (header, key, priority) of the rank columns, in display order. A column shows when any rank
# reports its key and, given a width, when it fits: the lowest priority numbers are chosen first.
_RANK_COLUMNS = (
    ("rank", "rank", 0), ("state", "state", 1), ("alive", "alive", 7), ("device", "device", 9),
    ("host", "host", 12), ("pid", "pid", 11), ("model", "model", 8), ("in flight", "in_flight", 4),
    ("done", "completed", 5), ("waiting", "num_waiting", 3), ("running", "num_running", 2),
    ("KV use", "kv_use", 6), ("KV used", "kv_used_tokens", 13), ("KV free", "kv_free_tokens", 14),
    ("heartbeat s", "heartbeat_age_s", 10), ("cache hit", "cache_hit", 6), ("prefix keys", "prefix_keys", 15),
)  # fmt: skip
_LEFT = frozenset({"state", "device", "host", "model"})
_STATUS_SCALARS = ("address", "routing", "uptime_s", "cpu_s")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "[red]no[/red]"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def kv_use(rank: dict[str, Any]) -> str:
    """The share of the rank's KV cache held by requests, as a percentage ("" if unknown)."""
    used, capacity = rank.get("kv_used_tokens"), rank.get("kv_capacity_tokens")
    if not isinstance(used, int | float) or not isinstance(capacity, int | float) or capacity <= 0:
        return ""
    return f"{100 * used / capacity:.0f}%"


def cache_hit(rank: dict[str, Any]) -> str:
    """Prompt tokens served from the rank's prefix cache over those looked up ("" if none yet)."""
    metrics = rank.get("metrics")
    if not isinstance(metrics, dict):
        return ""
    hits, queries = metrics.get("prefix_cache_hits"), metrics.get("prefix_cache_queries")
    if not isinstance(hits, int) or not isinstance(queries, int) or queries <= 0:
        return ""
    return f"{100 * hits / queries:.0f}%"


_DERIVED: dict[str, Callable[[dict[str, Any]], str]] = {"kv_use": kv_use, "cache_hit": cache_hit}
_NEEDS = {"kv_use": "kv_capacity_tokens", "cache_hit": "metrics"}


def _cell(rank: dict[str, Any], key: str) -> str:
    derive = _DERIVED.get(key)
    return derive(rank) if derive is not None else _fmt(rank.get(key, ""))


def _has(rank: dict[str, Any], key: str) -> bool:
    return _NEEDS.get(key, key) in rank


def _rank_table(title: str, ranks: list[dict[str, Any]], keys: set[str]) -> Table:
    table = Table(title=title, title_justify="left")
    columns = [(header, key) for header, key, _ in _RANK_COLUMNS if key in keys]
    for header, key in columns:
        table.add_column(header, justify="left" if key in _LEFT else "right", no_wrap=True)
    for r in ranks:
        table.add_row(*(_cell(r, key) for _, key in columns))
    return table


def fit_width(build: Callable[[set[str]], Table], keys_by_priority: list[str], width: int) -> Table:
    """The table of the most columns (taken in priority order) that fits ``width`` cells.

    The first column always shows, however narrow the terminal.
    """
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=width)
    unbounded = console.options.update(max_width=1 << 16)  # measure the natural width, not the clamp
    chosen: set[str] = set(keys_by_priority[:1])
    table = build(chosen)
    for key in keys_by_priority[1:]:
        candidate = build(chosen | {key})
        if Measurement.get(console, unbounded, candidate).maximum > width:
            continue  # a narrower column of lower priority may still fit
        chosen.add(key)
        table = candidate
    return table


def status_tables(status: dict[str, Any], width: int | None = None) -> list[Table]:
    """A ranks table (one row per rank; every field is in ``--json``) and a totals table.

    With ``width`` the ranks table keeps the most important columns that fit (rank, state,
    running, waiting, in flight, done, KV use, ...); without it, every column shows.
    """
    ranks = [r for r in status.get("ranks", []) if isinstance(r, dict)]
    state = status.get("state", "?")
    title = f"deployment: {state}, {len(ranks)} rank(s)"
    present = [
        key for _, key, _ in sorted(_RANK_COLUMNS, key=lambda c: c[2]) if any(_has(r, key) for r in ranks)
    ]
    if width is None:
        rank_table = _rank_table(title, ranks, set(present))
    else:
        rank_table = fit_width(lambda keys: _rank_table(title, ranks, keys), present, width)
    totals = Table(title="totals", title_justify="left", show_header=False)
    totals.add_column("name")
    totals.add_column("value", justify="right")
    shown: set[str] = set()
    for section in ("totals", "counters"):
        values = status.get(section)
        if isinstance(values, dict):
            for key, value in values.items():
                if key not in shown and not isinstance(value, dict | list | tuple):
                    shown.add(key)
                    totals.add_row(key, _fmt(value))
    for key in _STATUS_SCALARS:
        if key in status:
            totals.add_row(key, _fmt(status[key]))
    return [rank_table, totals] if totals.row_count else [rank_table]


def ack_json(ack: ControlAcknowledgement) -> dict[str, Any]:
    return {
        "signal": ack.signal,
        "state": ack.state,
        "ok": ack.ok,
        "error": ack.error,
        "acks": [a._asdict() for a in ack.acks],
    }


def ack_table(ack: ControlAcknowledgement) -> Table:
    """One row per rank acknowledgement, titled with the aggregate outcome."""
    outcome = "ok" if ack.ok else f"FAILED: {ack.error}"
    table = Table(title=f"{ack.signal} -> {ack.state} ({outcome})", title_justify="left")
    for name, justify in (("rank", "right"), ("ok", "left"), ("state", "left"), ("error", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for a in sorted(ack.acks, key=lambda a: a.rank):
        table.add_row(str(a.rank), "yes" if a.ok else "[red]no[/red]", a.state, a.error)
    return table


def result_json(result: GenerationResult) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    out["token_ids"] = list(result.token_ids)
    return out


def result_footer(result: GenerationResult) -> str:
    """One dim summary line: finish reason, tokens, rank, latency."""
    return (
        f"[{result.finish_reason}] {result.prompt_tokens} prompt + {result.completion_tokens} "
        f"completion tokens ({result.cached_tokens} cached), rank {result.rank}, "
        f"{result.latency_s * 1000:.1f} ms"
    )
