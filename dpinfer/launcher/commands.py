"""``dpinfer serve``: the coordinator, N torchrun ranks and the HTTP front in the foreground.

Ctrl-C (or SIGTERM) stops everything in order; so does ``dpinfer stop`` from elsewhere: once
the ranks have exited, ``serve`` says so and shuts the rest down by itself.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Unpack

import click

from dpinfer.config import CoordinatorConfig, RoutingPolicyName, default_address, new_deployment_id
from dpinfer.coordinator.commands import cache_routing_options
from dpinfer.http.commands import FrontOptions, front_options, http_config
from dpinfer.http.config import DEFAULT_HTTP_PORT
from dpinfer.launcher.options import (
    EngineOptions,
    engine_args_from_options,
    engine_options,
    rank_config_from_options,
)

if TYPE_CHECKING:
    from dpinfer.launcher.deployment import Deployment, ServeConfig

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
@click.option("--curve", "curve_dir", default=None,
              help="Turn on CurveZMQ with the keys in DIR, creating what is missing: the coordinator's, "
                   "and DIR/peers/{rank,client,admin} (clients: --curve-dir DIR/peers/client).")  # fmt: skip
@click.option("--insecure", is_flag=True, help="Let the coordinator listen beyond loopback without --curve.")
@click.option("--max-restarts", default=0, show_default=True, help="Restart a dead rank this many times.")
@click.option("--threads-per-rank", default=0, help="torch threads per rank on CPU (0: cores / dp).")
@click.option("--max-queued-requests", default=_COORD.max_queued_requests, show_default=True,
              help="Most requests the coordinator holds; beyond, 'overloaded' (HTTP 429).")  # fmt: skip
@click.option("--max-client-requests", default=_COORD.max_client_requests, show_default=True,
              help="Most requests one client (an API worker) may have in flight.")  # fmt: skip
@click.option("--migration-limit", default=_COORD.migration_limit, show_default=True,
              type=click.IntRange(min=0),
              help="Times a request may move to another rank mid-stream; then it fails.")  # fmt: skip
@click.option("--client-timeout-s", default=_COORD.client_timeout_s, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="A client silent this long is forgotten and its requests aborted.")  # fmt: skip
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Once ready, write the coordinator address here (and the HTTP URL on a second line).",
)
@click.option("--log-file", default=None, help="Send the ranks' logs here instead of the terminal.")
@click.option("--http-host", default="127.0.0.1", show_default=True, help="Interface the HTTP front binds.")
@click.option("--http-port", default=DEFAULT_HTTP_PORT, show_default=True, help="HTTP port (0: any free).")
@click.option("--no-http", is_flag=True, help="Start no HTTP front (the SDK and CLI only).")
@front_options
@engine_options
@cache_routing_options
def serve(dp: int, host: str, port: int, routing: str, deterministic: bool, curve_dir: str | None,
          insecure: bool, max_restarts: int, threads_per_rank: int, max_queued_requests: int,
          max_client_requests: int, migration_limit: int, client_timeout_s: float,
          ready_file: str | None, log_file: str | None, http_host: str, http_port: int, no_http: bool,
          api_workers: int, api_key: str | None, admin_api_key: str | None, served_model_name: str | None,
          allowed_local_media_path: str | None, max_body_bytes: int, cache_load_chars: int,
          cache_spread_threshold: int, **engine: Unpack[EngineOptions]) -> None:  # fmt: skip
    """Serve a model on DP ranks behind one coordinator and an OpenAI-compatible HTTP front,
    in the foreground (Ctrl-C stops)."""
    from dpinfer.coordinator.commands import check_exposure
    from dpinfer.errors import DpinferError

    check_exposure(host, curve_dir, insecure)
    front: FrontOptions = {
        "api_workers": api_workers, "api_key": api_key, "admin_api_key": admin_api_key,
        "served_model_name": served_model_name, "allowed_local_media_path": allowed_local_media_path,
        "max_body_bytes": max_body_bytes,
    }  # fmt: skip
    try:
        coordinator = CoordinatorConfig(
            host=host, port=port, routing=RoutingPolicyName(routing), deterministic=deterministic,
            curve_dir=curve_dir, max_queued_requests=max_queued_requests,
            max_client_requests=max_client_requests, migration_limit=migration_limit,
            client_timeout_s=client_timeout_s, cache_load_chars=cache_load_chars,
            cache_spread_threshold=cache_spread_threshold,
        )  # fmt: skip
        config = _serve_config(dp, coordinator, max_restarts, threads_per_rank, log_file, engine)
        if not no_http:
            import dataclasses

            http = http_config(default_address(), http_host, http_port, None, **front)
            config = dataclasses.replace(config, http=http)
    except DpinferError as e:  # a bad option: say which, before anything starts
        raise click.BadParameter(str(e)) from None
    _run(config, ready_file)


def _run(config: ServeConfig, ready_file: str | None) -> None:
    """Start, report ready, wait for Ctrl-C or for the ranks to be gone, stop in order."""
    from rich.console import Console

    from dpinfer.client.render import status_tables
    from dpinfer.errors import DpinferError
    from dpinfer.launcher.deployment import Deployment

    console = Console(stderr=True)
    deployment = Deployment(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    gone: list[int] = []
    try:
        with console.status("starting...") as spinner:
            address = deployment.start(lambda msg, _status: spinner.update(msg))
        with deployment.client(timeout_s=10.0) as client:
            client_status = client.status()
        console.print(status_tables(client_status)[0])
        http = f"; OpenAI API at [bold]{deployment.http_url}/v1[/]" if deployment.http_url else ""
        console.print(f"[bold green]ready[/] at [bold]{address}[/]{http} - Ctrl-C to stop")
        if ready_file:
            Path(ready_file).write_text(
                "".join(f"{line}\n" for line in (address, deployment.http_url) if line)
            )
        threading.Thread(target=_watch_ranks, args=(deployment, gone, stop), daemon=True).start()
        stop.wait()
        if gone:
            console.print(_why_gone(deployment, gone[0]))
        else:
            console.print("stopping: draining in-flight requests...")
    except DpinferError as e:
        raise click.ClickException(str(e)) from None
    finally:
        deployment.stop()
    console.print("stopped")
    if gone and gone[0] != 0:
        raise SystemExit(1)


def _watch_ranks(deployment: Deployment, gone: list[int], stop: threading.Event) -> None:
    gone.append(deployment.wait_ranks_gone())
    stop.set()


def _why_gone(deployment: Deployment, code: int) -> str:
    """Why the ranks exited: stopped on purpose (``dpinfer stop``), or not."""
    from dpinfer.errors import DpinferError

    state = "unknown"
    try:
        with deployment.client(timeout_s=2.0) as client:
            state = str(client.status().get("state"))
    except DpinferError:
        pass
    if state == "stopped" and code == 0:
        return "the ranks were stopped (`dpinfer stop`) and have exited: shutting down"
    return f"the ranks exited (torchrun code {code}, deployment state {state}): shutting down"


def _serve_config(
    dp: int, coordinator: CoordinatorConfig, max_restarts: int, threads_per_rank: int, log_file: str | None,
    engine: EngineOptions,
) -> ServeConfig:  # fmt: skip
    """Every option validated here (engine options too), so a typo fails in the terminal
    at once instead of inside N ranks a few seconds later."""
    from dpinfer.launcher.deployment import ServeConfig

    checked: EngineOptions = {**engine, "device": engine["device"] if engine["device"] != "auto" else "cpu"}
    rank_config_from_options(default_address(), **checked)
    return ServeConfig(
        dp=dp,
        coordinator=coordinator,
        engine_args=tuple(engine_args_from_options(**engine)),
        max_restarts=max_restarts,
        threads_per_rank=threads_per_rank,
        log_path=log_file,
        deployment_id=engine.get("deployment_id") or new_deployment_id(),
    )
