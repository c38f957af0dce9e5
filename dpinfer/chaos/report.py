"""A chaos run's report: one JSON-ready map (``--json``), or rich tables for a terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpinfer.chaos.run import ChaosResult

if TYPE_CHECKING:
    from rich.console import Console


def report_map(result: ChaosResult) -> dict[str, Any]:
    cfg = result.config
    return {
        "ok": result.ok,
        "seed": cfg.seed,
        "duration_s": cfg.duration_s,
        "model": cfg.model,
        "dp": cfg.dp,
        "max_restarts": cfg.max_restarts,
        "faults_chosen": [k.value for k in cfg.faults],
        "invariants": [c.as_map() for c in result.checks],
        "figures": result.figures,
        "faults": [o.as_map() for o in result.faults],
        "notes": result.notes,
        "log_dir": result.log_dir,
    }


def _figure(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value)


def print_report(console: Console, result: ChaosResult) -> None:
    from rich.table import Table

    cfg = result.config
    title = f"dpinfer chaos: seed {cfg.seed}, {cfg.duration_s:g} s, {cfg.model} --dp {cfg.dp}"
    checks = Table(title=title, title_justify="left")
    checks.add_column("invariant")
    checks.add_column("", justify="center")
    checks.add_column("detail", overflow="fold")
    for check in result.checks:
        checks.add_row(check.name, "[green]ok[/]" if check.ok else "[bold red]FAIL[/]", check.detail)
    console.print(checks)

    figures = Table(title="figures", title_justify="left")
    figures.add_column("figure")
    figures.add_column("value", overflow="fold")
    for name, value in result.figures.items():
        figures.add_row(name.replace("_", " "), _figure(value))
    console.print(figures)

    if result.faults:
        faults = Table(title="faults", title_justify="left")
        for column in ("at s", "kind", "target", "recovered in s", "detail"):
            faults.add_column(column, overflow="fold")
        for o in result.faults:
            recovered = (
                "skipped" if o.skipped else (f"{o.recovery_s:.1f}" if o.recovered and o.recovery_s else "NO")
            )
            faults.add_row(f"{o.at_s:.1f}", o.kind, o.target, recovered, o.detail)
        console.print(faults)
    for note in result.notes:
        console.print(f"note: {note}")
    verdict = "[bold green]every invariant held[/]" if result.ok else "[bold red]invariants failed[/]"
    console.print(verdict + (f" (logs: {result.log_dir})" if result.log_dir else ""))
