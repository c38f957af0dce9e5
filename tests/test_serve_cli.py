"""`dpinfer serve` rejects bad options in the terminal, before it starts anything."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dpinfer.launcher.commands import serve
from dpinfer.launcher.options import engine_args_from_options, rank_config_from_options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dp", "0"], "--dp must be >= 1"),
        (["--kv-cache-fraction", "3"], "--kv-cache-fraction must be in (0, 1]"),
        (["--max-running-requests", "0"], "--max-running-requests must be > 0"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--transport", "pigeon"], "'pigeon' is not one of"),
    ],
)
def test_bad_options_fail_at_once_with_the_flag_named(args: list[str], message: str) -> None:
    result = CliRunner().invoke(serve, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_engine_args_round_trip_into_the_same_rank_config() -> None:
    import click

    from dpinfer.launcher.options import engine_options

    seen: dict = {}

    @click.command()
    @engine_options
    def capture(**opts: object) -> None:
        seen.update(opts)

    args = ["--model", "tiny-llava", "--no-radix-cache", "--transport", "shm", "--max-kv-tokens", "96"]
    CliRunner().invoke(capture, [*args, "--device", "cpu"], catch_exceptions=False)
    first = dict(seen)
    CliRunner().invoke(capture, engine_args_from_options(**first), catch_exceptions=False)
    assert seen == first
    config = rank_config_from_options("tcp://127.0.0.1:1", **seen)
    assert config.model.model == "tiny-llava" and not config.scheduler.enable_radix_cache
    assert config.transport.transport.value == "shm" and config.scheduler.max_kv_tokens == 96
