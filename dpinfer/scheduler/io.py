"""What goes into and comes out of the in-process ``Scheduler``.

``TokenizedRequest`` arrives from the TokenizerProcess; ``SchedulerOutput`` goes to the
DetokenizerProcess; ``LoadReport`` feeds the rank's heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpinfer.sampling import SamplingParams


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
    (what ``dpinfer.engine.images.ImageProcessorAdapter`` makes) or precomputed
    ``{"image_features": [num_images, image_seq_length, hidden]}``; ``input_ids`` then hold
    ``image_seq_length`` image tokens per image, in image order (``dpinfer.runner.vision``)."""
    mm_hash: bytes | None = None
    """Content hash of the prompt's images: requests with different hashes never share KV.
    Computed from ``mm_inputs`` when a request with images arrives without one."""


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

    @classmethod
    def for_error(cls, request_id: int, prompt_len: int, error: str) -> SchedulerOutput:
        """The final output of a request that ends without generating anything."""
        return cls(request_id, [], True, "error", error=error, prompt_len=prompt_len)


@dataclass(frozen=True)
class LoadReport:
    """The scheduler's load, for heartbeats and routing."""

    num_waiting: int
    num_running: int
    kv_used_tokens: int
    """Slots held by requests (cached prefixes in use included)."""
    kv_free_tokens: int
    """Slots free now or reclaimable by evicting unused cached prefixes."""
    kv_capacity_tokens: int
