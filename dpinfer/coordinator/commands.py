"""``dpinfer coordinator`` and ``dpinfer keys``: thin shells over the coordinator package."""

from __future__ import annotations

from collections.abc import Callable

import click
import zmq

from dpinfer.config import ConfigError, CoordinatorConfig, RoutingPolicyName

_DEFAULTS = CoordinatorConfig()


def cache_routing_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``--cache-load-chars`` and ``--cache-spread-threshold``: the knobs of ``cache_aware``."""
    fn = click.option(
        "--cache-spread-threshold",
        default=_DEFAULTS.cache_spread_threshold,
        show_default=True,
        type=click.IntRange(min=1),
        help="cache_aware anti-hotspot rule: when the best-matching rank has this many more requests "
        "in flight than the least-loaded one, the request goes to the least-loaded.",
    )(fn)
    return click.option(
        "--cache-load-chars",
        default=_DEFAULTS.cache_load_chars,
        show_default=True,
        type=click.IntRange(min=0),
        help="cache_aware cost model: one more request in flight on a rank weighs as much as this "
        "many characters of cached prompt prefix.",
    )(fn)


@click.command()
@click.option(
    "--host",
    default=_DEFAULTS.host,
    show_default=True,
    help="Interface to bind; listen beyond loopback only with --curve.",
)
@click.option(
    "--port", default=_DEFAULTS.port, show_default=True, type=int, help="TCP port; 0 picks a free one."
)
@click.option(
    "--routing",
    default=_DEFAULTS.routing.value,
    show_default=True,
    type=click.Choice([p.value for p in RoutingPolicyName]),
    help="How requests are spread over ranks.",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Order ranks by rank id so the same request sequence lands on the same ranks.",
)
@click.option(
    "--heartbeat-interval-s",
    default=_DEFAULTS.heartbeat_interval_s,
    show_default=True,
    type=float,
    help="How often ranks report liveness and load.",
)
@click.option(
    "--heartbeat-timeout-s",
    default=_DEFAULTS.heartbeat_timeout_s,
    show_default=True,
    type=float,
    help="A rank silent this long is declared dead; its requests are re-dispatched or failed.",
)
@click.option(
    "--control-timeout-s",
    default=_DEFAULTS.control_timeout_s,
    show_default=True,
    type=float,
    help="How long a control signal waits for every rank's acknowledgement.",
)
@click.option(
    "--no-rank-timeout-s",
    default=_DEFAULTS.no_rank_timeout_s,
    show_default=True,
    type=float,
    help="How long a request waits for any live rank before it fails.",
)
@click.option(
    "--max-frame-bytes",
    default=_DEFAULTS.max_frame_bytes,
    show_default=True,
    type=int,
    help="Largest accepted message in bytes.",
)
@click.option(
    "--max-queued-requests",
    default=_DEFAULTS.max_queued_requests,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most requests the hub holds (waiting plus in flight); beyond it: an `overloaded` error.",
)
@click.option(
    "--max-client-requests",
    default=_DEFAULTS.max_client_requests,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most requests one client may have queued or in flight; beyond it: `overloaded`.",
)
@click.option(
    "--migration-limit",
    default=_DEFAULTS.migration_limit,
    show_default=True,
    type=click.IntRange(min=0),
    help="Times a request may move to another rank mid-stream (its rank died); then it fails.",
)
@click.option(
    "--client-timeout-s",
    default=_DEFAULTS.client_timeout_s,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="A client silent this long is forgotten and its requests aborted (the SDK keeps alive).",
)
@click.option(
    "--curve",
    "curve_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Turn on CurveZMQ: DIR holds server.key_secret and authorized/*.key (see `dpinfer keys`).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Listen beyond loopback without --curve (anyone who can reach the port can use it).",
)
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default) or ERROR.")
@cache_routing_options
def coordinator(
    host: str,
    port: int,
    routing: str,
    deterministic: bool,
    heartbeat_interval_s: float,
    heartbeat_timeout_s: float,
    control_timeout_s: float,
    no_rank_timeout_s: float,
    max_frame_bytes: int,
    max_queued_requests: int,
    max_client_requests: int,
    migration_limit: int,
    client_timeout_s: float,
    curve_dir: str | None,
    insecure: bool,
    log_level: str | None,
    cache_load_chars: int,
    cache_spread_threshold: int,
) -> None:
    """Run the coordinator: the one address clients and engine ranks connect to.

    Prints the address it listens on, then serves until SHUTDOWN, Ctrl-C or SIGTERM.
    """
    from dpinfer.coordinator.process import run_coordinator
    from dpinfer.log import set_level

    if log_level:
        set_level(log_level)
    try:
        config = CoordinatorConfig(
            host=host,
            port=port,
            routing=RoutingPolicyName(routing),
            deterministic=deterministic,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            control_timeout_s=control_timeout_s,
            no_rank_timeout_s=no_rank_timeout_s,
            max_frame_bytes=max_frame_bytes,
            max_queued_requests=max_queued_requests,
            max_client_requests=max_client_requests,
            cache_load_chars=cache_load_chars,
            cache_spread_threshold=cache_spread_threshold,
            migration_limit=migration_limit,
            client_timeout_s=client_timeout_s,
            curve_dir=curve_dir,
        )
        check_exposure(host, curve_dir, insecure)
        run_coordinator(config, on_ready=lambda address: click.echo(f"coordinator listening on {address}"))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except zmq.ZMQError as e:
        raise click.ClickException(f"cannot listen on tcp://{host}:{port}: {e}") from None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, curve_dir: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without CURVE unless the operator says ``--insecure``."""
    if host in LOOPBACK_HOSTS or curve_dir is not None:
        return
    if not insecure:
        raise click.UsageError(
            f"--host {host} without --curve would let anyone who reaches the port register as a rank, "
            "submit work and stop the deployment. Create keys (dpinfer keys --help) and pass --curve DIR, "
            "or pass --insecure to accept that on a trusted network."
        )
    click.echo(
        f"warning: listening on {host} without --curve (--insecure): anyone who can reach it can use it",
        err=True,
    )


@click.command()
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into."
)
@click.option(
    "--name",
    default="server",
    show_default=True,
    help="Key name: 'server' for the coordinator; e.g. 'client' or 'rank0' for a peer.",
)
@click.option(
    "--server-dir",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="A coordinator's --curve DIR: authorize the new key there and copy its server.key to --out.",
)
@click.option(
    "--role",
    type=click.Choice(["rank", "client", "admin"]),
    default=None,
    help="What the key may do (with --server-dir): rank registers; client submits, aborts its own "
    "requests and reads status; admin also sends control signals.",
)
def keys(out_dir: str, name: str, server_dir: str | None, role: str | None) -> None:
    """Write a CurveZMQ key pair (NAME.key, NAME.key_secret).

    \b
    Typical setup:
      dpinfer keys --out keys/server                                   # the coordinator's pair
      dpinfer keys --out keys/rank --name rank --role rank --server-dir keys/server
      dpinfer keys --out keys/client --name client --role client --server-dir keys/server
      dpinfer keys --out keys/admin --name admin --role admin --server-dir keys/server
      dpinfer coordinator --host 0.0.0.0 --curve keys/server
      ... ranks use --rank-curve-dir keys/rank, clients --curve-dir keys/client,
      ... operators (pause, stop, ...) --curve-dir keys/admin
    """
    from dpinfer.protocol.curve import Role, create_keys

    if server_dir is not None and role is None:
        raise click.UsageError(
            "--server-dir needs --role rank, client or admin: the key's role decides what it may do"
        )
    try:
        public, secret = create_keys(out_dir, name, server_dir, Role(role) if role else None)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"public key:  {public}")
    click.echo(f"secret key:  {secret} (keep it private)")
    if server_dir is not None:
        click.echo(f"authorized in {server_dir}/authorized; server public key copied to {out_dir}")
