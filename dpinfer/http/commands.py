"""``dpinfer http``: the OpenAI-compatible front alone, for a coordinator anywhere; and the
front's options that ``dpinfer serve`` shares. Nothing heavy is imported until it runs."""

from __future__ import annotations

import multiprocessing.connection
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, TypeVar, Unpack

import click

from dpinfer.config import DEFAULT_ADDRESS
from dpinfer.http.config import ADMIN_API_KEY_ENV, API_KEY_ENV, DEFAULT_HTTP_PORT, HttpConfig

F = TypeVar("F", bound=Callable[..., object])
_DEFAULTS = HttpConfig()

FRONT_OPTIONS: list[Callable[[F], F]] = [
    click.option("--api-workers", default=_DEFAULTS.api_workers, show_default=True,
                 help="API worker processes on the one port (SO_REUSEPORT)."),
    click.option("--api-key", envvar=API_KEY_ENV, default=None,
                 help=f"Bearer key the /v1 endpoints require (env {API_KEY_ENV}; default: open)."),
    click.option("--admin-api-key", envvar=ADMIN_API_KEY_ENV, default=None,
                 help=f"Bearer key of the control endpoints (env {ADMIN_API_KEY_ENV}); without any key "
                      "they answer loopback clients only."),
    click.option("--served-model-name", default=None,
                 help="The model name clients send (default: the model the ranks serve)."),
    click.option("--allowed-local-media-path", type=click.Path(file_okay=False), default=None,
                 help="Serve file:// image URLs from under this directory (default: never)."),
    click.option("--max-body-bytes", default=_DEFAULTS.max_body_bytes, show_default=True,
                 help="Largest request body (413 beyond)."),
]  # fmt: skip


class FrontOptions(TypedDict):
    """The values of ``FRONT_OPTIONS``, by parameter name."""

    api_workers: int
    api_key: str | None
    admin_api_key: str | None
    served_model_name: str | None
    allowed_local_media_path: str | None
    max_body_bytes: int


def front_options(func: F) -> F:
    for option in reversed(FRONT_OPTIONS):
        func = option(func)
    return func


def http_config(
    coordinator: str, host: str, port: int, curve_dir: str | None, **opts: Unpack[FrontOptions]
) -> HttpConfig:
    return HttpConfig(coordinator=coordinator, host=host, port=port, curve_dir=curve_dir, **opts)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--coordinator", envvar="DPINFER_ADDRESS", default=DEFAULT_ADDRESS, show_default=True,
              help="The coordinator's address (env DPINFER_ADDRESS).")  # fmt: skip
@click.option("--host", default=_DEFAULTS.host, show_default=True, help="Interface to bind.")
@click.option("--port", default=DEFAULT_HTTP_PORT, show_default=True, help="TCP port (0: any free).")
@click.option("--curve-dir", type=click.Path(file_okay=False), default=None,
              help="This front's CURVE client keys, when the coordinator uses CURVE.")  # fmt: skip
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.timeout_s,
              show_default=True, help="How long a connection attempt or status call may take.")  # fmt: skip
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the front's URL here once every API worker serves.")  # fmt: skip
@front_options
def http(coordinator: str, host: str, port: int, curve_dir: str | None, timeout_s: float,
         ready_file: str | None, **opts: Unpack[FrontOptions]) -> None:  # fmt: skip
    """Serve the OpenAI-compatible HTTP API for a running coordinator (Ctrl-C stops)."""
    import dataclasses

    from rich.console import Console

    from dpinfer.errors import DpinferError
    from dpinfer.http.server import start_http_front

    console = Console(stderr=True)
    try:
        config = dataclasses.replace(
            http_config(coordinator, host, port, curve_dir, **opts), timeout_s=timeout_s
        )
    except DpinferError as e:
        raise click.BadParameter(str(e)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        front = start_http_front(config)
    except DpinferError as e:
        raise click.ClickException(str(e)) from None
    why = "stopping"
    try:

        def watch() -> None:
            nonlocal why
            multiprocessing.connection.wait([p.sentinel for p in front.processes])
            why = "an API worker exited; stopping"
            stop.set()

        threading.Thread(target=watch, daemon=True, name="dpinfer-http-watch").start()
        console.print(f"[bold green]HTTP front[/] at [bold]{front.url}[/] ({config.api_workers} API "
                      f"worker(s)) for the coordinator at {coordinator} - Ctrl-C to stop")  # fmt: skip
        if ready_file:
            Path(ready_file).write_text(front.url + "\n")
        stop.wait()
        console.print(why)
    finally:
        front.stop()
    console.print("stopped")
