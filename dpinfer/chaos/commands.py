"""``dpinfer chaos``: a seeded fault run against a real deployment; exits 1 if an invariant fails."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from typing import TYPE_CHECKING

import click

from dpinfer.chaos.plan import ChaosConfig, FaultKind, parse_faults
from dpinfer.errors import DpinferError

if TYPE_CHECKING:
    from rich.console import Console

    from dpinfer.chaos.run import ChaosResult

_DEFAULTS = ChaosConfig()
EXIT_INTERRUPTED = 130


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--duration", "duration_s", default=_DEFAULTS.duration_s, show_default=True, type=float,
              help="Seconds of faults and workload (after start-up and the reference pass).")  # fmt: skip
@click.option("--seed", default=_DEFAULTS.seed, show_default=True, type=int,
              help="Draws the fault schedule, its targets and the workload.")  # fmt: skip
@click.option("--faults", "faults_text", default="all", show_default=True,
              help="Comma list of: " + ", ".join(k.value for k in FaultKind) + " (or all).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--model", default=_DEFAULTS.model, show_default=True, help="Model every rank serves.")
@click.option("--dp", default=_DEFAULTS.dp, show_default=True, help="Number of data-parallel ranks.")
@click.option("--max-restarts", default=_DEFAULTS.max_restarts, show_default=True,
              help="Restarts each rank has; a killed rank or scheduler spends one.")  # fmt: skip
@click.option("--concurrency", default=_DEFAULTS.concurrency, show_default=True,
              help="Workload requests kept in flight.")  # fmt: skip
@click.option("--deadline-s", default=_DEFAULTS.deadline_s, show_default=True, type=float,
              help="No request may take longer than this from submission to its final reply.")  # fmt: skip
@click.option("--keep-logs", is_flag=True, help="Keep the deployment's logs even when every invariant holds.")
def chaos(duration_s: float, seed: int, faults_text: str, as_json: bool, model: str, dp: int,
          max_restarts: int, concurrency: int, deadline_s: float, keep_logs: bool) -> None:  # fmt: skip
    """Start a deployment, drive a mixed workload and inject faults on a seeded schedule
    (killed, frozen and restarted processes, vanished clients, floods); then check that every
    request ended exactly once, greedy outputs match an undisturbed run, no deadline passed,
    memory stayed bounded and nothing was left behind. Exits 1 if any invariant fails."""
    from rich.console import Console

    from dpinfer.chaos.report import print_report, report_map

    try:
        config = ChaosConfig(
            duration_s=duration_s, seed=seed, faults=parse_faults(faults_text), model=model, dp=dp,
            max_restarts=max_restarts, concurrency=concurrency, deadline_s=deadline_s,
        )  # fmt: skip
    except DpinferError as e:
        raise click.BadParameter(str(e)) from None
    console = Console(stderr=True)
    try:
        result = _run(config, console)
    except KeyboardInterrupt:
        console.print("interrupted: everything the run started has been stopped")
        sys.exit(EXIT_INTERRUPTED)
    except DpinferError as e:
        raise click.ClickException(str(e)) from None
    if result.ok and not keep_logs and result.log_dir:
        shutil.rmtree(result.log_dir, ignore_errors=True)
        result.log_dir = None
    if as_json:
        click.echo(json.dumps(report_map(result)))
    else:
        print_report(Console(), result)
    if not result.ok:
        sys.exit(1)


def _run(config: ChaosConfig, console: Console) -> ChaosResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpinfer.chaos.run import run_chaos

    columns = (
        TextColumn("[bold]chaos[/]"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def progress(line: str, fraction: float) -> None:
            bar.update(task, description=line, completed=fraction)

        async def main() -> ChaosResult:
            loop = asyncio.get_running_loop()
            current = asyncio.current_task()
            assert current is not None
            loop.add_signal_handler(signal.SIGTERM, current.cancel)  # SIGTERM cleans up like Ctrl-C
            return await run_chaos(config, progress)

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
