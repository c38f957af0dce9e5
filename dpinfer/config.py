"""Configuration: one frozen dataclass per component, validated once in ``__post_init__``.

Per-rank copies come from ``dataclasses.replace``. Every local address and shared-memory
name is derived here (``ipc_address``, ``shm_name``) from a per-launch ``deployment_id``,
so two deployments on one host never collide. Choices are ``str`` enums; a bad value
raises ``ConfigError`` naming the flag and listing the valid values.
"""

from __future__ import annotations

import enum
import os
import secrets
import tempfile
from dataclasses import dataclass, field

from dpinfer.errors import DpinferError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
SHM_PREFIX = "dpinfer"


class ConfigError(DpinferError, ValueError):
    """A configuration value the user must fix; the message names the flag."""


def _choice(enum_cls: type[enum.StrEnum], value: str, flag: str) -> enum.StrEnum:
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(e.value for e in enum_cls)
        raise ConfigError(f"{flag}: {value!r} is not one of: {valid}") from None


def _positive(value: float, flag: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def default_address() -> str:
    return os.environ.get("DPINFER_ADDRESS", DEFAULT_ADDRESS)


def new_deployment_id() -> str:
    """A short random id naming one launch; suffixes every ipc path and shm name."""
    return secrets.token_hex(4)


class LocalSocket(enum.StrEnum):
    """The ``ipc://`` sockets inside one rank, named by the process that binds them."""

    TOKENIZER_IN = "tokenizer-in"
    SCHEDULER_IN = "scheduler-in"
    SCHEDULER_CONTROL = "scheduler-control"
    DETOKENIZER_IN = "detokenizer-in"
    RANK_OUTPUTS = "rank-outputs"


def ipc_address(deployment_id: str, rank: int, name: str) -> str:
    """The local ``ipc://`` address of socket ``name`` of ``rank`` in one deployment."""
    base = os.environ.get("DPINFER_IPC_DIR", tempfile.gettempdir())
    return f"ipc://{base}/{SHM_PREFIX}-{deployment_id}-r{rank}-{name}"


def shm_name(deployment_id: str, rank: int, name: str) -> str:
    """The POSIX shared-memory name of segment ``name``; all start with ``dpinfer-``."""
    return f"{SHM_PREFIX}-{deployment_id}-r{rank}-{name}"


# ---------------------------------------------------------------------------- coordinator


class RoutingPolicyName(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    CACHE_AWARE = "cache_aware"


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 unless you mean to listen beyond loopback (use --curve then)."""
    port: int = 5555
    """TCP port; 0 picks a free one (the bound address is reported)."""
    routing: RoutingPolicyName = RoutingPolicyName.ROUND_ROBIN
    """How requests are spread over ranks."""
    deterministic: bool = False
    """Order ranks by rank id so the same request sequence always lands on the same ranks."""
    heartbeat_interval_s: float = 0.5
    """How often ranks report liveness and load."""
    heartbeat_timeout_s: float = 3.0
    """A rank silent for this long is declared dead; its requests are re-dispatched or failed."""
    control_timeout_s: float = 60.0
    """How long a control signal waits for every rank's acknowledgement."""
    no_rank_timeout_s: float = 60.0
    """How long a request waits for any live rank before it fails."""
    max_frame_bytes: int = 256 << 20
    """Largest accepted message; larger ones are dropped by ZMQ and counted."""
    max_queued_requests: int = 65536
    """Most requests the hub holds at once (waiting for a rank plus in flight); beyond it a
    request gets an immediate ``overloaded`` error (HTTP 429), never a silent drop."""
    max_client_requests: int = 16384
    """Most requests one client may have queued or in flight; beyond it, ``overloaded``."""
    migration_limit: int = 3
    """How many times one request may move to another rank after streaming output (its rank
    died, was declared dead or terminated); beyond it the request fails with an error saying so."""
    dead_rank_ttl_s: float = 300.0
    """How long ``status`` keeps listing a rank after it died or left; then it is forgotten."""
    client_timeout_s: float = 30.0
    """A client silent this long (no message, no keepalive) is forgotten and its requests are
    aborted on their ranks. The SDK sends keepalives well within it while it is connected."""
    curve_dir: str | None = None
    """With CURVE on: directory holding ``server.key_secret`` and ``authorized/*.key``."""
    cache_load_chars: int = 256
    """``cache_aware``: one more request in flight on a rank weighs as much as this many
    characters of cached prompt prefix (see ``coordinator.routing``)."""
    cache_spread_threshold: int = 4
    """``cache_aware`` anti-hotspot rule: when the best-matching rank has this many more
    requests in flight than the least-loaded one, the request goes to the least-loaded."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", _choice(RoutingPolicyName, self.routing, "--routing"))
        if self.cache_load_chars < 0 or self.cache_spread_threshold < 1:
            raise ConfigError("--cache-load-chars must be >= 0 and --cache-spread-threshold >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        _positive(self.heartbeat_interval_s, "--heartbeat-interval-s")
        _positive(self.heartbeat_timeout_s, "--heartbeat-timeout-s")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("--heartbeat-timeout-s must exceed --heartbeat-interval-s")
        _positive(self.control_timeout_s, "--control-timeout-s")
        _positive(self.no_rank_timeout_s, "--no-rank-timeout-s")
        _positive(self.max_queued_requests, "--max-queued-requests")
        _positive(self.max_client_requests, "--max-client-requests")
        if self.migration_limit < 0:
            raise ConfigError(f"--migration-limit must be >= 0, got {self.migration_limit}")
        _positive(self.client_timeout_s, "--client-timeout-s")

    @property
    def bind_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literals need brackets
        return f"tcp://{host}:{self.port}"


# ---------------------------------------------------------------------------- engine rank


class TransportMode(enum.StrEnum):
    """How the TokenizerProcess hands tokenized requests to the SchedulerProcess."""

    ZMQ = "zmq"
    SHM = "shm"
    TENSOR_QUEUE = "tensor_queue"


class TensorTransportMode(enum.StrEnum):
    """How tensors that live on a GPU in the TokenizerProcess reach the SchedulerProcess."""

    DEFAULT = "default"
    CUDA_IPC = "cuda_ipc"
    CUDA_IPC_POOL = "cuda_ipc_pool"


@dataclass(frozen=True)
class ModelConfig:
    model: str = "tiny-llama"
    """A built-in name (see ``dpinfer.runner.registry``) or a local Hugging Face directory."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""
    dtype: str = "float32"
    """``float32``, ``bfloat16`` or ``float16``."""
    cache_dir: str | None = None
    """Where built-in models are built/converted; default ``$DPINFER_CACHE`` or ~/.cache/dpinfer."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype: {self.dtype!r} is not one of: float32, bfloat16, float16")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device must be cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    kv_cache_bytes: int = 0
    """KV pool size in bytes; 0 means ``kv_cache_fraction`` of free memory."""
    kv_cache_fraction: float = 0.1
    """Fraction of free device memory for the KV pool when ``kv_cache_bytes`` is 0."""
    max_kv_tokens: int = 0
    """Cap on KV pool tokens (0: no cap); handy for tests that force retraction."""
    kv_prefault: bool = False
    """Write the whole KV pool once when it is allocated (and on resume). On CPU the pool's
    pages are otherwise mapped on first use, which slows the first requests down (about a
    second per GiB, paid inside their steps) and can hit the memory limit mid-run; with it
    the memory is committed, and that second per GiB paid, at start."""
    max_running_requests: int = 64
    """Most requests decoding at once."""
    max_prefill_tokens: int = 2048
    """Token budget of one step. With ``mixed_steps`` the running requests' decode tokens
    count first and prompt chunks get the rest; prompts longer than that are chunked."""
    enable_radix_cache: bool = True
    """Reuse KV of shared prompt prefixes across requests."""
    mixed_steps: bool = True
    """Decode tokens and prompt chunks share one forward pass (a prefill never stalls the
    running streams); False alternates prefill-only and decode-only steps."""

    def __post_init__(self) -> None:
        _positive(self.kv_cache_bytes, "--kv-cache-bytes", allow_zero=True)
        if not 0 < self.kv_cache_fraction <= 1:
            raise ConfigError(f"--kv-cache-fraction must be in (0, 1], got {self.kv_cache_fraction}")
        _positive(self.max_kv_tokens, "--max-kv-tokens", allow_zero=True)
        _positive(self.max_running_requests, "--max-running-requests")
        _positive(self.max_prefill_tokens, "--max-prefill-tokens")


@dataclass(frozen=True)
class TransportConfig:
    transport: TransportMode = TransportMode.ZMQ
    tensor_transport: TensorTransportMode = TensorTransportMode.DEFAULT
    shm_region_bytes: int = 64 << 20
    """Size of the pre-allocated shared-memory region of the ``shm`` transport."""
    cuda_pool_bytes: int = 256 << 20
    """Size of the GPU workspace of ``cuda_ipc_pool``."""
    inline_bytes: int = 256 << 10
    """Tensors smaller than this are pickled inline (latency-bound anyway) in every mode."""
    shm_wait_s: float = 1.0
    """How long a sender waits for room in a full shm region before pickling inline (counted)."""
    shm_copy_out: bool = False
    """``shm`` receiver copies each tensor out and frees its slot at once; default: hand out a
    view of the slot (fastest) that frees the slot when the last reference to it is dropped."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "transport", _choice(TransportMode, self.transport, "--transport"))
        object.__setattr__(
            self,
            "tensor_transport",
            _choice(TensorTransportMode, self.tensor_transport, "--tensor-transport"),
        )
        _positive(self.shm_region_bytes, "--shm-region-bytes")
        _positive(self.cuda_pool_bytes, "--cuda-pool-bytes")
        _positive(self.inline_bytes, "--inline-bytes", allow_zero=True)
        _positive(self.shm_wait_s, "--shm-wait-s", allow_zero=True)


@dataclass(frozen=True)
class RankConfig:
    """Everything one engine rank needs; ``dataclasses.replace`` gives per-rank copies."""

    coordinator: str = DEFAULT_ADDRESS
    rank: int = 0
    deployment_id: str = field(default_factory=new_deployment_id)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    ready_timeout_s: float = 300.0
    """How long the rank waits for each child process's ready message."""
    connect_timeout_s: float = 60.0
    """How long the rank retries reaching the coordinator before it exits."""
    curve_dir: str | None = None
    """With CURVE: directory holding this peer's key pair and the server's public key."""
    num_threads: int = 0
    """torch threads of the scheduler (its share of the node's cores); 0 leaves torch's default."""

    def __post_init__(self) -> None:
        _positive(self.num_threads, "--threads-per-rank", allow_zero=True)
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        _positive(self.ready_timeout_s, "--ready-timeout-s")
        _positive(self.connect_timeout_s, "--connect-timeout-s")
