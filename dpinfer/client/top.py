"""``dpinfer top``: a live view of a deployment, refreshed every ``--interval`` seconds.

Each frame is one coordinator STATUS map: per rank its state, running and waiting requests,
KV use, output tokens/s (the ``generation_tokens`` delta since the previous frame) and the
median time to first token over the last minute (from the delta of its cumulative histogram,
as Prometheus' ``histogram_quantile`` does), plus a totals row. ``q`` or Ctrl-C quits; keys
are read without blocking and the terminal is restored on the way out. ``--once`` prints one
frame and exits (latencies then cover everything since each rank started; rates need two
frames). ``Watch`` is the I/O-free part: the samples and the figures derived from them.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from dpinfer.client.commands import cli_client, connection_options
from dpinfer.errors import DpinferError

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from dpinfer.client.sync_client import InferenceClient

WINDOW_S = 60.0
"""How far back the latency quantiles look."""

Status = dict[str, Any]


def quantile(q: float, edges: Sequence[float], buckets: Sequence[float], count: float) -> float | None:
    """The ``q`` quantile of a histogram (cumulative ``buckets`` per upper edge, ``count`` in
    all), interpolated linearly inside its bucket; ``None`` when it is empty."""
    if count <= 0:
        return None
    target = q * count
    lower, below = 0.0, 0.0
    for edge, cumulative in zip(edges, buckets, strict=True):
        if cumulative >= target and cumulative > below:
            return lower + (edge - lower) * (target - below) / (cumulative - below)
        lower, below = edge, cumulative
    return edges[-1] if edges else None  # in the +Inf bucket: the highest finite edge


@dataclass(frozen=True)
class Histo:
    """One histogram as the status map carries it (``RankMetrics.as_map``), or a difference."""

    edges: tuple[float, ...]
    buckets: tuple[float, ...]
    count: float

    @classmethod
    def of(cls, rank: Status | None, name: str) -> Histo | None:
        h = (rank or {}).get("metrics", {}).get(name)
        if not isinstance(h, dict) or len(h.get("le", ())) != len(h.get("buckets", ())):
            return None
        return cls(tuple(h["le"]), tuple(h["buckets"]), h.get("count", 0))

    def minus(self, older: Histo | None) -> Histo:
        """What was observed since ``older`` (everything, if the rank restarted meanwhile)."""
        if older is None or older.edges != self.edges or older.count > self.count:
            return self
        return Histo(
            self.edges,
            tuple(a - b for a, b in zip(self.buckets, older.buckets, strict=True)),
            self.count - older.count,
        )

    def plus(self, other: Histo) -> Histo:
        return Histo(
            self.edges,
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
            self.count + other.count,
        )

    def p50(self) -> float | None:
        return quantile(0.5, self.edges, self.buckets, self.count)


@dataclass(frozen=True)
class Row:
    """What one line of the view shows (``None``: not known yet)."""

    label: str
    state: str
    running: int
    waiting: int
    kv_used: int
    kv_capacity: int
    tokens_per_s: float | None
    ttft: Histo | None
    finished: int


class Watch:
    """The status samples of the last ``window_s`` seconds and the rows they give."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, Status]] = deque()

    def add(self, at: float, status: Status) -> None:
        self.samples.append((at, status))
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    @property
    def latest(self) -> Status:
        return self.samples[-1][1] if self.samples else {}

    def rows(self) -> list[Row]:
        """One row per rank, then the totals (``all``) when there are ranks."""
        if not self.samples:
            return []
        now, latest = self.samples[-1]
        previous = self.samples[-2] if len(self.samples) > 1 else None
        oldest = self.samples[0][1] if len(self.samples) > 1 else None
        rows = [self._row(r, now, previous, oldest) for r in _ranks(latest)]
        return [*rows, _total(rows)] if rows else rows

    def _row(
        self, r: Status, now: float, previous: tuple[float, Status] | None, oldest: Status | None
    ) -> Row:
        rank = r.get("rank")
        alive = r.get("alive") is True
        rate = None
        if previous is not None and alive and now > previous[0]:
            before = _rank(previous[1], rank)
            tokens, old = _generated(r), _generated(before) if before else 0
            rate = (tokens - old if tokens >= old else tokens) / (now - previous[0])
        ttft = Histo.of(r, "time_to_first_token_seconds")
        if ttft is not None:
            ttft = ttft.minus(
                Histo.of(_rank(oldest, rank), "time_to_first_token_seconds") if oldest else None
            )
        finished = r.get("metrics", {}).get("finished", {})
        return Row(
            label=str(rank),
            state=str(r.get("state", "?")) if alive else "dead",
            running=int(r.get("num_running", 0)) if alive else 0,
            waiting=int(r.get("num_waiting", 0)) if alive else 0,
            kv_used=int(r.get("kv_used_tokens", 0)) if alive else 0,
            kv_capacity=int(r.get("kv_capacity_tokens", 0)) if alive else 0,
            tokens_per_s=rate,
            ttft=ttft,
            finished=sum(int(v) for v in finished.values()) if isinstance(finished, dict) else 0,
        )


def _ranks(status: Status) -> list[Status]:
    return [r for r in status.get("ranks", []) if isinstance(r, dict)]


def _rank(status: Status | None, rank: object) -> Status | None:
    return next((r for r in _ranks(status or {}) if r.get("rank") == rank), None)


def _generated(rank: Status) -> int:
    return int(rank.get("metrics", {}).get("generation_tokens", 0))


def _total(rows: list[Row]) -> Row:
    rates = [r.tokens_per_s for r in rows if r.tokens_per_s is not None]
    ttft: Histo | None = None
    for r in rows:
        if r.ttft is not None:
            ttft = r.ttft if ttft is None or ttft.edges != r.ttft.edges else ttft.plus(r.ttft)
    return Row(
        label="all",
        state=f"{sum(r.state != 'dead' for r in rows)} live",
        running=sum(r.running for r in rows),
        waiting=sum(r.waiting for r in rows),
        kv_used=sum(r.kv_used for r in rows),
        kv_capacity=sum(r.kv_capacity for r in rows),
        tokens_per_s=sum(rates) if rates else None,
        ttft=ttft,
        finished=sum(r.finished for r in rows),
    )


# ---------------------------------------------------------------------------- rendering

# (header, priority): the columns, most important first when the terminal is narrow.
_COLUMNS = (
    ("rank", 0), ("state", 1), ("running", 2), ("waiting", 3), ("KV use", 4), ("tokens/s", 5),
    ("TTFT p50", 6), ("finished", 7),
)  # fmt: skip


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _cells(row: Row) -> dict[str, str]:
    kv = f"{100 * row.kv_used / row.kv_capacity:.0f}%" if row.kv_capacity > 0 else "-"
    state = f"[red]{row.state}[/red]" if row.state == "dead" else row.state
    return {
        "rank": row.label, "state": state, "running": str(row.running), "waiting": str(row.waiting),
        "KV use": kv, "tokens/s": "-" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}",
        "TTFT p50": _seconds(row.ttft.p50() if row.ttft else None), "finished": str(row.finished),
    }  # fmt: skip


def _table(title: str, rows: list[Row], headers: set[str]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    shown = [h for h, _ in _COLUMNS if h in headers]
    for header in shown:
        table.add_column(header, justify="left" if header == "state" else "right", no_wrap=True)
    for i, row in enumerate(rows):
        cells = _cells(row)
        table.add_row(*(cells[h] for h in shown), end_section=i == len(rows) - 2)
    return table


def frame(watch: Watch, width: int, error: str = "", live: bool = True) -> RenderableType:
    """One screen: the table of ranks under a title with the deployment's state, then a hint
    (``live``) or the reason the coordinator did not answer."""
    from rich.console import Group
    from rich.text import Text

    from dpinfer.client.render import fit_width

    status = watch.latest
    totals = status.get("totals", {})
    title = (
        f"dpinfer top: {status.get('state', '?')} at {status.get('address', '?')}, "
        f"{totals.get('in_flight', 0)} in flight, {totals.get('pending', 0)} pending"
    )
    rows = watch.rows()
    by_priority = [h for h, _ in sorted(_COLUMNS, key=lambda c: c[1])]
    table = fit_width(lambda headers: _table(title, rows, headers), by_priority, width)
    if error:
        return Group(table, Text(f"coordinator unreachable: {error}", style="red"))
    return Group(table, Text("q quits", style="dim")) if live else table


# ---------------------------------------------------------------------------- the command


@contextmanager
def _keys() -> Iterator[int | None]:
    """Single key presses from a terminal (cbreak: no echo, no Enter, Ctrl-C still interrupts);
    the terminal settings come back however the block ends. Off a terminal: no keys."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    if fd is None:
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_key(fd: int | None, timeout_s: float) -> str:
    """Keys pressed within ``timeout_s`` ("" if none); without a terminal, just waits."""
    if fd is None:
        threading.Event().wait(max(0.0, timeout_s))
        return ""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
    return os.read(fd, 64).decode(errors="ignore") if ready else ""


def _poll(client: InferenceClient) -> tuple[Status | None, str]:
    try:
        return client.status(), ""
    except DpinferError as e:
        return None, str(e)


@click.command()
@connection_options
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (no terminal needed).")
def top(address: str, timeout_s: float, curve_dir: str | None, interval: float, once: bool) -> None:
    """Watch a deployment live: per rank state, load, KV use, tokens/s and TTFT; q quits."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    watch = Watch()
    with cli_client(address, timeout_s, curve_dir) as client:
        if once:
            watch.add(time.monotonic(), client.status())
            console.print(frame(watch, console.width, live=False))
            return
        try:
            with _keys() as fd, Live(console=console, screen=console.is_terminal, auto_refresh=False) as live:
                while True:
                    started = time.monotonic()
                    status, error = _poll(client)
                    if status is not None:
                        watch.add(started, status)
                    live.update(frame(watch, console.width, error), refresh=True)
                    if "q" in _wait_for_key(fd, started + interval - time.monotonic()).lower():
                        return
        except KeyboardInterrupt:
            return
