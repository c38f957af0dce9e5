"""Client-side CLI commands: ``status``, the control signals, ``update-weights`` and ``generate``.

Each command is options -> ``InferenceClient`` call -> rich table (or ``--json``). Failures a
user can cause (no coordinator at the address, an invalid transition, a bad prompt) exit
non-zero with one clear line, never a traceback. Nothing heavy is imported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click

from dpinfer.client.render import ack_json, ack_table, result_footer, result_json, status_tables
from dpinfer.client.session import ControlAcknowledgement
from dpinfer.client.sync_client import InferenceClient
from dpinfer.config import DEFAULT_ADDRESS
from dpinfer.errors import DpinferError
from dpinfer.outputs import GenerationResult
from dpinfer.sampling import SamplingParams

DEFAULT_CLI_TIMEOUT_S = 10.0
_DEFAULTS = SamplingParams()
_CLI_NAME = "dpinfer-cli"

if TYPE_CHECKING:
    from rich.console import Console


def connection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--address``, ``--timeout-s`` and ``--curve-dir``, shared by every client command."""
    options = [
        click.option(
            "--address",
            envvar="DPINFER_ADDRESS",
            default=DEFAULT_ADDRESS,
            show_default=True,
            help="The coordinator's address (env DPINFER_ADDRESS).",
        ),
        click.option(
            "--timeout-s",
            type=click.FloatRange(min=0, min_open=True),
            default=DEFAULT_CLI_TIMEOUT_S,
            show_default=True,
            help="How long to wait for the coordinator to answer.",
        ),
        click.option(
            "--curve-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Directory with this client's CURVE key pair and the coordinator's server.key.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def json_flag(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


@contextlib.contextmanager
def cli_client(address: str, timeout_s: float, curve_dir: str | None) -> Iterator[InferenceClient]:
    """An ``InferenceClient``; every dpinfer error becomes a one-line ``ClickException``."""
    try:
        with InferenceClient(address, timeout_s=timeout_s, curve_dir=curve_dir, client_name=_CLI_NAME) as c:
            yield c
    except DpinferError as e:
        raise click.ClickException(str(e)) from None


def _console() -> Console:
    from rich.console import Console

    # Piped output (logs, CI) should not be squeezed into the 80 columns rich assumes there,
    # unless COLUMNS says how wide (rich reads it).
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)


def _print_tables(tables: Sequence[Any], console: Console | None = None) -> None:
    console = console or _console()
    for table in tables:
        console.print(table)


@click.command()
@connection_options
@json_flag
def status(address: str, timeout_s: float, curve_dir: str | None, as_json: bool) -> None:
    """Show the deployment state, every rank's load and the totals.

    The table keeps the columns that fit the terminal; ``--json`` has every figure, each
    rank's request metrics included (the ones ``/metrics`` serves).
    """
    with cli_client(address, timeout_s, curve_dir) as c:
        info = c.status()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        console = _console()
        _print_tables(status_tables(info, width=console.width), console)


def _report_ack(ack: ControlAcknowledgement, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ack_json(ack), indent=2))
    else:
        _print_tables([ack_table(ack)])


def _control_command(name: str, method: str, doc: str) -> click.Command:
    @click.command(name=name, help=doc)
    @connection_options
    @json_flag
    def command(address: str, timeout_s: float, curve_dir: str | None, as_json: bool) -> None:
        with cli_client(address, timeout_s, curve_dir) as c:
            ack = getattr(c, method)()
        _report_ack(ack, as_json)

    return command


pause = _control_command(
    "pause", "pause_engines", "Pause every rank (RUNNING -> PAUSED); in-flight requests keep their KV cache."
)
unpause = _control_command("unpause", "unpause_engines", "Resume scheduling (PAUSED -> RUNNING).")
suspend = _control_command(
    "suspend", "suspend_engines", "Release KV cache memory while paused (PAUSED -> SUSPENDED)."
)
resume = _control_command(
    "resume", "resume_engines", "Re-allocate the KV cache (SUSPENDED -> PAUSED; then `dpinfer unpause`)."
)


@click.command()
@connection_options
@click.option("--abort", is_flag=True, help="Abort in-flight requests instead of draining them.")
@click.option(
    "--deadline-s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="How long ranks may drain in-flight work before aborting what is left.",
)
@json_flag
def stop(
    address: str, timeout_s: float, curve_dir: str | None, abort: bool, deadline_s: float, as_json: bool
) -> None:
    """Stop every rank: drain (or --abort) in-flight requests, then the ranks exit."""
    with cli_client(address, timeout_s, curve_dir) as c:
        ack = c.stop_engines(drain=not abort, deadline_s=deadline_s)
    _report_ack(ack, as_json)


@click.command(name="update-weights")
@click.argument("path")
@connection_options
@json_flag
def update_weights(address: str, timeout_s: float, curve_dir: str | None, path: str, as_json: bool) -> None:
    """Load new weights from PATH on every rank (only while paused)."""
    with cli_client(address, timeout_s, curve_dir) as c:
        ack = c.update_weights(path)
    _report_ack(ack, as_json)


@click.command(context_settings={"show_default": True})
@click.argument("prompt")
@connection_options
@click.option("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens, help="Most tokens to generate.")
@click.option(
    "--temperature", type=float, default=_DEFAULTS.temperature, help="Softmax temperature; 0 is greedy."
)
@click.option("--top-p", type=float, default=_DEFAULTS.top_p, help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", type=int, default=_DEFAULTS.top_k, help="Keep the k most likely tokens; 0 disables.")
@click.option("--seed", type=int, default=None, help="Per-request seed for reproducible sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="A string that ends generation (repeatable).")
@click.option(
    "--image", "images", multiple=True, type=click.Path(dir_okay=False), help="Image file (repeatable)."
)
@click.option(
    "--chat", is_flag=True, help="Send PROMPT as a user chat message (the rank applies the template)."
)
@click.option("--rank", type=int, default=None, help="Pin the request to this engine rank.")
@click.option("-n", "--n", "n", type=int, default=1, help="Completions of PROMPT (prefilled once).")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@json_flag
def generate(
    prompt: str,
    address: str,
    timeout_s: float,
    curve_dir: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop_strings: tuple[str, ...],
    images: tuple[str, ...],
    chat: bool,
    rank: int | None,
    n: int,
    stream: bool,
    as_json: bool,
) -> None:
    """Generate a completion for PROMPT (with -n, several: each with seed + j when seeded)."""
    if stream and n > 1:
        raise click.UsageError("--stream prints one completion: drop --stream to get -n completions")
    request: dict[str, Any] = {"prompt": prompt}
    if chat:
        request = {"messages": [{"role": "user", "content": prompt}]}
    if images:
        request["images"] = list(images)
    with cli_client(address, timeout_s, curve_dir) as c:
        try:
            sampling = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=stop_strings,
                n=n,
            )
        except DpinferError as e:
            raise click.UsageError(str(e)) from None
        if stream:
            results = [_stream(c, request, sampling, rank, as_json)]
        else:
            results = c.generate(request, sampling, rank=rank)
            _print_results(results, as_json)
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise click.ClickException(f"request failed: {failed[0].error}")
    if not as_json:
        from rich.console import Console

        for result in results:
            Console(stderr=True).print(f"[dim]{result_footer(result)}[/dim]")


def _print_results(results: list[GenerationResult], as_json: bool) -> None:
    """One result as before; several (``-n``) as a JSON list, or each text under its index."""
    if as_json:
        shown = [result_json(r) for r in results]
        click.echo(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2))
        return
    for result in results:
        if len(results) > 1:
            click.secho(f"--- completion {result.index} ---", dim=True)
        if result.finish_reason != "error":
            click.echo(result.text)


def _stream(
    client: InferenceClient,
    request: dict[str, Any],
    sampling: SamplingParams,
    rank: int | None,
    as_json: bool,
) -> Any:
    result = None
    for delta in client.generate_stream(request, sampling, rank=rank):
        if as_json:
            line = {"request_id": delta.request_id, "text": delta.text, "token_ids": list(delta.token_ids)}
            line["finished"] = delta.finished
            if delta.result is not None:
                line["result"] = result_json(delta.result)
            click.echo(json.dumps(line))
        else:
            click.echo(delta.text, nl=False)
        if delta.finished:
            result = delta.result
    if not as_json:
        click.echo()
    assert result is not None, "a stream always ends with a finished delta"
    return result


__all__ = ["generate", "pause", "resume", "status", "stop", "suspend", "unpause", "update_weights"]
