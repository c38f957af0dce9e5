"""Typed messages between the processes of one engine rank (local ``ipc://`` only).

These travel pickled on sockets that never leave the host (``ipc://`` addresses from
``config.ipc_address``), so they are plain frozen dataclasses. Grouped by receiver::

    rank main  --TokenizeRequests / AbortRequests / SetLimits / Shutdown-->  tokenizer
    tokenizer  --TokenizedRequest / AbortRequests (the transport channel)-->  scheduler
    rank main  --EngineControl / Shutdown (control socket)-->                scheduler
    scheduler  --SchedulerBatch-->                                           detokenizer
    rank main  --Shutdown-->                                                 detokenizer
    detokenizer, tokenizer  --RankOutputs-->                                 rank main
    every child  --ChildReady / ChildFailed (its start pipe)-->              rank main

Control results ride the scheduler -> detokenizer -> rank main path with the outputs, so
an acknowledgement never overtakes the outputs produced before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.protocol.kinds import EngineState
from dpinfer.protocol.messages import ControlAck, EngineOutputEntry, LoadStats, RankMetrics
from dpinfer.sampling import SamplingParams

CacheEvents = tuple[tuple[int, ...], tuple[int, ...], bool]
"""``(inserted, evicted, reset)`` routing keys of a rank's prefix cache."""

INTERNAL_CONTROL_ID = -1
"""``control_id`` of control commands the rank main issues itself (never acknowledged upstream)."""


# ---------------------------------------------------------------------------- start-up

ReportReady = Callable[[dict[str, int]], None]
"""What a child calls exactly once when it serves, with the small facts the rank main needs."""


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
class SetCacheKeys:
    """Compute routing keys for each request (the coordinator asked for cache reports)."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class SetLimits:
    """Limits known only once the scheduler is up; sent before any request."""

    max_prompt_len: int


# ---------------------------------------------------------------------------- tokenizer -> scheduler
@dataclass
class TokenizedRequest:
    """One request, tokenized. ``request_id`` is unique among the scheduler's live requests."""

    request_id: int
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    """Send new tokens every step; otherwise one output when the request finishes."""
    mm_inputs: dict[str, Any] | None = None
    """Images, for a vision-language model only: ``{"pixel_values": float [num_images, C, H, W]}``
    (what ``dpinfer.tokenizer.images.ImageProcessorAdapter`` makes) or precomputed
    ``{"image_features": [num_images, image_seq_length, hidden]}``; ``input_ids`` then hold
    ``image_seq_length`` image tokens per image, in image order (``dpinfer.runner.vision``)."""
    mm_hash: bytes | None = None
    """Content hash of the prompt's images: requests with different hashes never share KV.
    Computed from ``mm_inputs`` when a request with images arrives without one."""
    resume_ids: tuple[int, ...] = ()
    """A continuation (``bodies.Resume``): output tokens generated already, elsewhere. The
    scheduler prefills prompt + these and counts them as output (limits, stop checks)."""
    resume_chars: int = 0
    """Characters of their text the client has received already."""
    cache_keys: tuple[tuple[int, int], ...] = ()
    """Routing keys (``protocol.prefix_keys``) with the number of prompt tokens each covers,
    in increasing order; only when the hub routes ``cache_aware`` (``SetCacheKeys``)."""
    group: int | None = None
    """Parallel sampling: the requests of one group are completions of one prompt
    (``bodies.RequestBody.group``); the scheduler prefills it once for all of them."""


# ---------------------------------------------------------------------------- rank main -> scheduler


@dataclass(frozen=True, slots=True)
class ReachState:
    """Walk the lifecycle to ``state`` (PAUSE/SUSPEND or RESUME/UNPAUSE steps, none acknowledged
    upstream): how a rank that (re-)registers joins a deployment that is paused or suspended."""

    state: EngineState


# ---------------------------------------------------------------------------- scheduler -> detokenizer


@dataclass(frozen=True)
class SchedulerOutput:
    """Progress of one request.

    ``new_token_ids`` are output tokens not reported before: each step's new token for a
    ``stream`` request, everything at once for the others. A stop token (EOS or one of
    ``stop_token_ids``) that ends the request is *not* included (``matched_stop`` holds its
    id); the token that completes a ``stop`` string *is* included (``matched_stop`` holds
    the string, and the detokenizer cuts the text there). Note that ``transformers``
    ``generate`` keeps the EOS token in its output sequence.
    """

    request_id: int
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    """``stop``, ``length``, ``abort`` or ``error`` once finished."""
    matched_stop: str | int | None = None
    error: str | None = None
    prompt_len: int = 0
    cached_len: int = 0
    """Prompt tokens whose KV came from the prefix cache when the request was first admitted."""
    error_code: str | None = None
    """An ``ErrorCode`` value when ``finish_reason`` is ``error`` (none: an internal error)."""
    stop_reason: str | int | None = None
    """The user-facing ``matched_stop``: ``None`` for EOS (``GenerationResult.stop_reason``)."""
    logprobs: list[PositionLogprobs] | None = None
    """With ``SamplingParams.logprobs``: one entry per token of ``new_token_ids``."""
    prompt_logprobs: list[PositionLogprobs] | None = None
    """With ``SamplingParams.prompt_logprobs``, on the final output: one per prompt token after the first."""

    @classmethod
    def for_error(cls, request_id: int, prompt_len: int, error: str) -> SchedulerOutput:
        """The final output of a request that ends without generating anything."""
        code = "invalid_request"  # what the scheduler refuses, the request asked for (too long, ...)
        return cls(request_id, [], True, "error", error=error, prompt_len=prompt_len, error_code=code)


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What the detokenizer needs to know about a request before its first output."""

    request_id: int
    stream: bool
    stop: tuple[str, ...] = ()
    prompt_tail: tuple[int, ...] = ()
    """The last few prompt token ids: decoding context for the first output tokens."""
    resume_ids: tuple[int, ...] = ()
    """A continuation's output so far (replayed into the detokenizer, not sent again)."""
    resume_chars: int = 0
    """Characters of that output's text the client has received."""
    min_tokens: int = 0
    """No stop string counts in the text of the first ``min_tokens - 1`` tokens."""
    include_stop_str: bool = False
    """``SamplingParams.include_stop_str_in_output``."""


@dataclass(frozen=True, slots=True)
class SchedulerBatch:
    """Everything one scheduler step produced, in order: metas, outputs, then control results.

    ``outputs`` holds ``dpinfer.protocol.local.SchedulerOutput`` values.
    """

    metas: tuple[RequestMeta, ...] = ()
    outputs: tuple[SchedulerOutput, ...] = ()
    control_acks: tuple[ControlAck, ...] = ()
    load: LoadStats | None = None
    metrics: RankMetrics | None = None
    """Sent with ``load`` (both or neither), when either changed."""
    cache_events: CacheEvents | None = None
    """Routing keys the prefix cache started and stopped holding (``scheduler.cache_keys``)."""


# ---------------------------------------------------------------------------- -> rank main


@dataclass(frozen=True, slots=True)
class RankOutputs:
    """Wire-ready outputs (``OutputBody`` bytes) for one ``send_outputs``, then control results."""

    entries: tuple[EngineOutputEntry, ...] = ()
    bodies: tuple[bytes, ...] = ()
    control_acks: tuple[ControlAck, ...] = ()
    load: LoadStats | None = None
    metrics: RankMetrics | None = None
    cache_events: CacheEvents | None = None
