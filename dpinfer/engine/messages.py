"""Typed messages between the processes of one engine rank (local ``ipc://`` only).

These travel pickled on sockets that never leave the host (``ipc://`` addresses from
``config.ipc_address``), so they are plain frozen dataclasses. Grouped by receiver::

    rank main  --TokenizeRequests / AbortRequests / SetLimits / Shutdown-->  tokenizer
    tokenizer  --TokenizedRequest / AbortRequests (the transport channel)-->  scheduler
    rank main  --ControlCommand / Shutdown (control socket)-->               scheduler
    scheduler  --SchedulerBatch-->                                           detokenizer
    rank main  --Shutdown-->                                                 detokenizer
    detokenizer, tokenizer  --RankOutputs-->                                 rank main
    every child  --ChildReady / ChildFailed (its start pipe)-->              rank main

Control results ride the scheduler -> detokenizer -> rank main path with the outputs, so
an acknowledgement never overtakes the outputs produced before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpinfer.protocol import EngineOutputEntry

# Names of the child processes; also the ``name`` of their ipc sockets.
TOKENIZER = "tokenizer"
SCHEDULER = "scheduler"
DETOKENIZER = "detokenizer"
CHILD_NAMES = (TOKENIZER, SCHEDULER, DETOKENIZER)

# ipc socket names (``config.ipc_address(deployment_id, rank, name)``).
ADDR_TOKENIZER_IN = "tokenizer-in"
ADDR_SCHEDULER_IN = "scheduler-in"
ADDR_SCHEDULER_CONTROL = "scheduler-control"
ADDR_DETOKENIZER_IN = "detokenizer-in"
ADDR_RANK_OUTPUTS = "rank-outputs"
ALL_ADDRS = (
    ADDR_TOKENIZER_IN,
    ADDR_SCHEDULER_IN,
    ADDR_SCHEDULER_CONTROL,
    ADDR_DETOKENIZER_IN,
    ADDR_RANK_OUTPUTS,
)

INTERNAL_CONTROL_ID = -1
"""``control_id`` of control commands the rank main issues itself (never acknowledged upstream)."""


# ---------------------------------------------------------------------------- start-up


@dataclass(frozen=True, slots=True)
class ChildReady:
    """A child built everything and is serving. ``info`` holds what the rank main needs."""

    name: str
    pid: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChildFailed:
    """A child could not start; ``error`` is the user-facing reason (e.g. an unknown model)."""

    name: str
    pid: int
    error: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Exit the loop and clean up."""

    reason: str = ""


# ---------------------------------------------------------------------------- rank main -> tokenizer


@dataclass(frozen=True, slots=True)
class RawRequest:
    """One request as it came off the wire: its body is an undecoded msgpack map."""

    request_id: int
    stream: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class TokenizeRequests:
    requests: tuple[RawRequest, ...]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    """Abort these requests; forwarded by the tokenizer on the same ordered channel as requests."""

    request_ids: tuple[int, ...]
    reason: str = "aborted"


@dataclass(frozen=True, slots=True)
class SetLimits:
    """Limits known only once the scheduler is up; sent before any request."""

    max_prompt_len: int


# ---------------------------------------------------------------------------- rank main -> scheduler


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """A lifecycle signal for the scheduler (``protocol.Signal`` value) and its arguments."""

    control_id: int
    signal: str
    args: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- scheduler -> detokenizer


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What the detokenizer needs to know about a request before its first output."""

    request_id: int
    stream: bool
    stop: tuple[str, ...] = ()
    prompt_tail: tuple[int, ...] = ()
    """The last few prompt token ids: decoding context for the first output tokens."""


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """The scheduler's load, as the heartbeat reports it."""

    num_waiting: int = 0
    num_running: int = 0
    kv_used_tokens: int = 0
    kv_free_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ControlResult:
    """The outcome of a ``ControlCommand``; ``state`` is the scheduler's state afterwards."""

    control_id: int
    signal: str
    ok: bool
    state: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class SchedulerBatch:
    """Everything one scheduler step produced, in order: metas, outputs, then control results.

    ``outputs`` holds ``dpinfer.scheduler.io.SchedulerOutput`` values.
    """

    metas: tuple[RequestMeta, ...] = ()
    outputs: tuple[Any, ...] = ()
    control_results: tuple[ControlResult, ...] = ()
    load: LoadSnapshot | None = None


# ---------------------------------------------------------------------------- -> rank main


@dataclass(frozen=True, slots=True)
class RankOutputs:
    """Wire-ready outputs (``OutputBody`` bytes) for one ``send_outputs``, then control results."""

    entries: tuple[EngineOutputEntry, ...] = ()
    bodies: tuple[bytes, ...] = ()
    control_results: tuple[ControlResult, ...] = ()
    load: LoadSnapshot | None = None
