"""Rich renderings shared by ``serve``, ``demo`` and ``bench serve``."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def ranks_table(status: dict[str, Any], title: str = "ranks") -> Table:
    table = Table(title=title)
    for column in ("rank", "pid", "host", "device", "model", "alive", "in flight", "completed"):
        table.add_column(column)
    for r in sorted(status.get("ranks", []), key=lambda r: r.get("rank", 0)):
        table.add_row(
            str(r.get("rank")),
            str(r.get("pid")),
            str(r.get("host")),
            str(r.get("device")),
            str(r.get("model")),
            "[green]yes[/]" if r.get("alive") else "[red]no[/]",
            str(r.get("in_flight", 0)),
            str(r.get("completed", 0)),
        )
    return table
