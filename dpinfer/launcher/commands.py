"""``dpinfer serve``: the coordinator and N torchrun ranks in the foreground, stopped by Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Unpack

import click

from dpinfer.config import CoordinatorConfig, RoutingPolicyName, default_address, new_deployment_id
from dpinfer.launcher.options import (
    EngineOptions,
    engine_args_from_options,
    engine_options,
    rank_config_from_options,
)

if TYPE_CHECKING:
    from dpinfer.launcher.deployment import ServeConfig

_COORD = CoordinatorConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dp", default=1, show_default=True, help="Number of data-parallel ranks on this node.")
@click.option("--host", default=_COORD.host, show_default=True, help="Interface the coordinator binds.")
@click.option("--port", default=_COORD.port, show_default=True, help="Coordinator TCP port (0: any free).")
@click.option(
    "--routing",
    default=_COORD.routing.value,
    show_default=True,
    type=click.Choice([p.value for p in RoutingPolicyName]),
    help="How requests are spread.",
)
@click.option("--deterministic", is_flag=True, help="Order ranks by id: same requests, same ranks.")
@click.option("--curve", "curve_dir", default=None, help="Turn on CurveZMQ with the keys in this directory.")
@click.option("--max-restarts", default=0, show_default=True, help="Restart a dead rank this many times.")
@click.option("--threads-per-rank", default=0, help="torch threads per rank on CPU (0: cores / dp).")
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the coordinator address here once every rank is ready.",
)
@click.option("--log-file", default=None, help="Send the ranks' logs here instead of the terminal.")
@engine_options
def serve(dp: int, host: str, port: int, routing: str, deterministic: bool, curve_dir: str | None,
          max_restarts: int, threads_per_rank: int, ready_file: str | None, log_file: str | None,
          **engine: Unpack[EngineOptions]) -> None:  # fmt: skip
    """Serve a model on DP ranks behind one coordinator, in the foreground (Ctrl-C stops)."""
    from rich.console import Console

    from dpinfer.client.render import status_tables
    from dpinfer.errors import DpinferError
    from dpinfer.launcher.deployment import Deployment

    console = Console(stderr=True)
    try:
        config = _serve_config(dp, host, port, routing, deterministic, curve_dir, max_restarts,
                               threads_per_rank, log_file, engine)  # fmt: skip
    except DpinferError as e:  # a bad option: say which, before anything starts
        raise click.BadParameter(str(e)) from None
    deployment = Deployment(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with console.status("starting...") as spinner:
            address = deployment.start(lambda msg, _status: spinner.update(msg))
        with deployment.client(timeout_s=10.0) as client:
            client_status = client.status()
        console.print(status_tables(client_status)[0])
        console.print(f"[bold green]ready[/] at [bold]{address}[/] - Ctrl-C to stop")
        if ready_file:
            Path(ready_file).write_text(address + "\n")
        stop.wait()
        console.print("stopping: draining in-flight requests...")
    except DpinferError as e:
        raise click.ClickException(str(e)) from None
    finally:
        deployment.stop()
    console.print("stopped")


def _serve_config(
    dp: int, host: str, port: int, routing: str, deterministic: bool, curve_dir: str | None,
    max_restarts: int, threads_per_rank: int, log_file: str | None, engine: EngineOptions,
) -> ServeConfig:  # fmt: skip
    """Every option validated here (engine options too), so a typo fails in the terminal
    at once instead of inside N ranks a few seconds later."""
    from dpinfer.launcher.deployment import ServeConfig

    checked: EngineOptions = {**engine, "device": engine["device"] if engine["device"] != "auto" else "cpu"}
    rank_config_from_options(default_address(), **checked)
    coordinator = CoordinatorConfig(
        host=host,
        port=port,
        routing=RoutingPolicyName(routing),
        deterministic=deterministic,
        curve_dir=curve_dir,
    )
    return ServeConfig(
        dp=dp,
        coordinator=coordinator,
        engine_args=tuple(engine_args_from_options(**engine)),
        max_restarts=max_restarts,
        threads_per_rank=threads_per_rank,
        log_path=log_file,
        deployment_id=engine.get("deployment_id") or new_deployment_id(),
    )
