"""The engine-rank options shared by ``dpinfer serve``, the torchrun worker and ``bench serve``.

Defaults and choices come from the config dataclasses, so the CLI never drifts from them.
``EngineOptions`` is what a command decorated with ``engine_options`` receives for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypedDict, TypeVar, Unpack, cast

import click

from dpinfer.config import (
    ModelConfig,
    RankConfig,
    SchedulerConfig,
    TensorTransportMode,
    TransportConfig,
    TransportMode,
    new_deployment_id,
)

F = TypeVar("F", bound=Callable[..., object])

_MODEL = ModelConfig()
_SCHED = SchedulerConfig()
_TRANSPORT = TransportConfig()


ENGINE_OPTIONS: list[Callable[[F], F]] = [
    click.option("--model", default=_MODEL.model, show_default=True,
                 help="tiny-llama, tiny-llava, smollm2-135m, or a local Hugging Face model directory."),
    click.option("--device", default="auto", show_default=True,
                 help="cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK when CUDA is there, else cpu)."),
    click.option("--dtype", default=_MODEL.dtype, show_default=True,
                 type=click.Choice(["float32", "bfloat16", "float16"]), help="Model and KV cache dtype."),
    click.option("--kv-cache-bytes", default=_SCHED.kv_cache_bytes, show_default=True,
                 help="KV pool size per rank in bytes (0: --kv-cache-fraction of free memory)."),
    click.option("--kv-cache-fraction", default=_SCHED.kv_cache_fraction, show_default=True,
                 help="Fraction of free memory for the KV pool when --kv-cache-bytes is 0."),
    click.option("--max-kv-tokens", default=_SCHED.max_kv_tokens, show_default=True,
                 help="Cap on KV pool tokens per rank (0: no cap)."),
    click.option("--kv-prefault/--no-kv-prefault", default=_SCHED.kv_prefault, show_default=True,
                 help="Commit the KV pool's memory at start (CPU: ~1 s per GiB), not in the first steps."),
    click.option("--max-running-requests", default=_SCHED.max_running_requests, show_default=True,
                 help="Most requests decoding at once per rank."),
    click.option("--max-prefill-tokens", default=_SCHED.max_prefill_tokens, show_default=True,
                 help="Token budget of one step: decode tokens first, then prompt chunks."),
    click.option("--mixed-steps/--no-mixed-steps", default=_SCHED.mixed_steps, show_default=True,
                 help="Run decodes and prompt chunks in one forward pass (off: alternate)."),
    click.option("--radix-cache/--no-radix-cache", default=_SCHED.enable_radix_cache, show_default=True,
                 help="Reuse the KV of shared prompt prefixes."),
    click.option("--transport", default=_TRANSPORT.transport.value, show_default=True,
                 type=click.Choice([m.value for m in TransportMode]),
                 help="Tokenizer -> scheduler transport inside a rank (shm: shared-memory fast path)."),
    click.option("--tensor-transport", default=_TRANSPORT.tensor_transport.value, show_default=True,
                 type=click.Choice([m.value for m in TensorTransportMode]),
                 help="How GPU tensors travel inside a rank."),
    click.option("--shm-region-bytes", default=_TRANSPORT.shm_region_bytes, show_default=True,
                 help="Size of the shared-memory region of the shm transport, per rank."),
    click.option("--deployment-id", default=None,
                 help="Names this launch's local sockets and shared memory (default: random)."),
    click.option("--rank-curve-dir", "rank_curve_dir", default=None,
                 help="CURVE key directory of the ranks (client key pair + server public key)."),
    click.option("--ready-timeout-s", default=300.0, show_default=True,
                 help="How long a rank waits for each of its processes to be ready."),
    click.option("--connect-timeout-s", default=60.0, show_default=True,
                 help="How long a rank retries reaching the coordinator before it exits."),
]  # fmt: skip


class EngineOptions(TypedDict):
    """The values of ``ENGINE_OPTIONS``, by parameter name (one key per option)."""

    model: str
    device: str
    dtype: str
    kv_cache_bytes: int
    kv_cache_fraction: float
    max_kv_tokens: int
    kv_prefault: bool
    max_running_requests: int
    max_prefill_tokens: int
    mixed_steps: bool
    radix_cache: bool
    transport: str
    tensor_transport: str
    shm_region_bytes: int
    deployment_id: str | None
    rank_curve_dir: str | None
    ready_timeout_s: float
    connect_timeout_s: float


def engine_options(func: F) -> F:
    """Add every option of ``ENGINE_OPTIONS`` to the click command ``func``."""
    for option in reversed(ENGINE_OPTIONS):
        func = option(func)
    return func


def rank_config_from_options(
    coordinator: str, rank: int = 0, *, num_threads: int = 0, **opts: Unpack[EngineOptions]
) -> RankConfig:
    """Build a ``RankConfig`` from the values of ``engine_options`` (extra keys are ignored)."""
    model = ModelConfig(model=opts["model"], device=opts.get("device") or "cpu", dtype=opts["dtype"])
    scheduler = SchedulerConfig(
        kv_cache_bytes=opts["kv_cache_bytes"],
        kv_cache_fraction=opts["kv_cache_fraction"],
        max_kv_tokens=opts["max_kv_tokens"],
        kv_prefault=opts["kv_prefault"],
        max_running_requests=opts["max_running_requests"],
        max_prefill_tokens=opts["max_prefill_tokens"],
        mixed_steps=opts["mixed_steps"],
        enable_radix_cache=opts["radix_cache"],
    )
    # The option strings become enums in TransportConfig.__post_init__, whose errors name the flag.
    transport = dataclasses.replace(
        _TRANSPORT,
        transport=cast(TransportMode, opts["transport"]),
        tensor_transport=cast(TensorTransportMode, opts["tensor_transport"]),
        shm_region_bytes=opts.get("shm_region_bytes", _TRANSPORT.shm_region_bytes),
    )
    return RankConfig(
        coordinator=coordinator,
        rank=rank,
        deployment_id=opts.get("deployment_id") or new_deployment_id(),
        model=model,
        scheduler=scheduler,
        transport=transport,
        ready_timeout_s=opts["ready_timeout_s"],
        connect_timeout_s=opts["connect_timeout_s"],
        curve_dir=opts.get("rank_curve_dir"),
        num_threads=num_threads,
    )


def engine_args_from_options(**opts: Unpack[EngineOptions]) -> list[str]:
    """Turn ``engine_options`` values back into command-line arguments (for torchrun)."""
    args: list[str] = []
    for option in ENGINE_OPTIONS:
        param = option(lambda: None).__click_params__[0]  # type: ignore[attr-defined]
        value = opts.get(param.name)
        if value is None:
            continue
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args
