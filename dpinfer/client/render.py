"""Rich tables and JSON shapes for the client-side CLI commands (status, control acks, results).

Only plain data goes in (status maps, ``ControlAcknowledgement``, ``GenerationResult``). The
status table shows the rank fields an operator scans for (those the coordinator reports);
everything else is in ``--json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.table import Table

from dpinfer.client.session import ControlAcknowledgement
from dpinfer.outputs import GenerationResult

# (header, key) of the rank columns, in order; a column shows when any rank reports its key.
_RANK_COLUMNS = (
    ("rank", "rank"), ("state", "state"), ("alive", "alive"), ("device", "device"), ("host", "host"),
    ("pid", "pid"), ("model", "model"), ("in flight", "in_flight"), ("done", "completed"),
    ("waiting", "num_waiting"), ("running", "num_running"), ("KV used", "kv_used_tokens"),
    ("KV free", "kv_free_tokens"), ("heartbeat s", "heartbeat_age_s"),
)  # fmt: skip
_LEFT = frozenset({"state", "device", "host", "model"})
_STATUS_SCALARS = ("address", "routing", "uptime_s", "cpu_s")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "[red]no[/red]"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def status_tables(status: dict[str, Any]) -> list[Table]:
    """A ranks table (one row per rank; every field is in ``--json``) and a totals table."""
    ranks = [r for r in status.get("ranks", []) if isinstance(r, dict)]
    state = status.get("state", "?")
    rank_table = Table(title=f"deployment: {state}, {len(ranks)} rank(s)", title_justify="left")
    columns = [(header, key) for header, key in _RANK_COLUMNS if any(key in r for r in ranks)]
    for header, key in columns:
        rank_table.add_column(header, justify="left" if key in _LEFT else "right")
    for r in ranks:
        rank_table.add_row(*(_fmt(r.get(key, "")) for _, key in columns))
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
