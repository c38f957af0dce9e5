"""The ``dpinfer`` command line: a thin shell over the package.

Each command lives beside the code it drives and is imported only when it runs (or when
``--help`` lists it), so ``dpinfer --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import click

# name -> "module:attribute"; the module must not import torch or transformers at import time.
COMMANDS: dict[str, str] = {
    "serve": "dpinfer.launcher.commands:serve",
    "coordinator": "dpinfer.coordinator.commands:coordinator",
    "status": "dpinfer.client.commands:status",
    "pause": "dpinfer.client.commands:pause",
    "unpause": "dpinfer.client.commands:unpause",
    "suspend": "dpinfer.client.commands:suspend",
    "resume": "dpinfer.client.commands:resume",
    "stop": "dpinfer.client.commands:stop",
    "update-weights": "dpinfer.client.commands:update_weights",
    "generate": "dpinfer.client.commands:generate",
    "keys": "dpinfer.coordinator.commands:keys",
    "bench": "dpinfer.bench.commands:bench",
    "demo": "dpinfer.launcher.demo:demo",
    "http": "dpinfer.http.commands:http",
    "top": "dpinfer.client.top:top",
    "chaos": "dpinfer.chaos.commands:chaos",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self._lazy, *super().list_commands(ctx)])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            hint = f"'{cmd_name}' is not available in this build ({e})"
            return click.Command(cmd_name, help=f"(unavailable: {e})", callback=_fail_with(hint))


def _fail_with(message: str) -> Callable[[], None]:
    def callback() -> None:
        raise click.ClickException(message)

    return callback


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpinfer", message="dpinfer %(version)s")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default) or ERROR.")
def cli(log_level: str | None) -> None:
    """dpinfer: serve a language model on N data-parallel replicas behind one coordinator.

    Start with `dpinfer serve --model tiny-llama --dp 2`, then `dpinfer generate "Hi"`.
    """
    if log_level:
        from dpinfer.log import set_level

        set_level(log_level)


def main() -> None:
    cli(prog_name="dpinfer")
