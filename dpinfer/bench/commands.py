"""``dpinfer bench ...``: each workload is its own module, imported when it runs."""

from __future__ import annotations

import click

from dpinfer.cli import LazyGroup

BENCHES = {
    "coordinator": "dpinfer.bench.coordinator:command",
    "engine": "dpinfer.bench.engine:command",
    "transport": "dpinfer.bench.transport:command",
    "serve": "dpinfer.bench.serve:command",
    "http": "dpinfer.bench.http:command",
    "gpu-check": "dpinfer.bench.gpu_check:command",
    "routing": "dpinfer.bench.routing:command",
}


@click.group(cls=LazyGroup, lazy=BENCHES)
def bench() -> None:
    """Benchmarks that compare systems side by side in one run and report ratios."""
