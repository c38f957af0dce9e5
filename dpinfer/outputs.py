"""What the client SDK hands back: ``GenerationResult`` and ``StreamDelta``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

TokenLogprobs: TypeAlias = dict[int, float]
"""One position's logprobs: token id -> logprob, the ``K`` most likely tokens first (most
likely first), then the sampled (or prompt) token if it is not among them (vLLM's shape)."""


@dataclass(frozen=True)
class Routing:
    """Why the request went to the rank that served it (``GenerationResult.routing``).

    ``reason``: with ``cache_aware``, ``match`` (the rank holding the longest prefix, weighed
    against load), ``pending`` (the same, but the rank's match is a prefix the hub sent it
    recently that it has not reported yet: it is still prefilling it), ``spread`` (that rank
    was loaded past the anti-hotspot threshold; the least-loaded took it), ``load`` (no rank
    held a prefix), ``credit`` (the choice was full), ``pinned``, or ``group`` (a completion of
    ``SamplingParams.n`` sent where the first went); with the other policies, the policy's own
    name.
    """

    policy: str
    """``round_robin``, ``least_loaded`` or ``cache_aware``."""
    rank: int
    matched_chars: int = 0
    """Characters of the prompt's prefix the chosen rank's cache held, or (``pending``) was
    about to hold (``cache_aware``)."""
    reason: str = ""

    def header(self) -> str:
        """The ``x-dpinfer-routing`` HTTP header value."""
        matched = self.matched_chars
        return f"policy={self.policy}; rank={self.rank}; matched_chars={matched}; reason={self.reason}"


@dataclass(frozen=True)
class GenerationResult:
    """The final result of one request."""

    request_id: int
    """The client-side request id."""
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    """``stop``, ``length``, ``abort`` or ``error``."""
    error: str | None = None
    """What went wrong when ``finish_reason`` is ``error`` (or why it was aborted)."""
    error_code: str | None = None
    """Why, for machines (``protocol.ErrorCode``): ``invalid_request``, ``overloaded`` (retry
    later), ``unavailable`` (no rank can serve it now), ``aborted`` or ``internal``."""
    rank: int = -1
    """The engine rank that served it (-1 if none did)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the rank's prefix cache."""
    latency_s: float = 0.0
    """Seconds from submission to the final reply, measured by the client."""
    stop_reason: str | int | None = None
    """What ended a ``stop`` request: the matched stop string, or the stop token id of
    ``stop_token_ids``; ``None`` for EOS, ``length`` and failures (as in vLLM)."""
    logprobs: list[TokenLogprobs] | None = None
    """With ``SamplingParams.logprobs``: one map per token of ``token_ids`` (else ``None``)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: one map per prompt token, ``None`` for the first."""
    token_texts: dict[int, str] | None = None
    """The text of each token id in ``logprobs``/``prompt_logprobs``, decoded alone by the
    rank's tokenizer (what OpenAI's ``token`` field shows)."""
    routing: Routing | None = None
    """Where the hub sent it and why (``None`` when no rank served it)."""
    index: int = 0
    """Which of its prompt's ``SamplingParams.n`` completions this is (0..n-1)."""

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length")


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed request. Concatenating every ``text`` gives the final text."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    finished: bool = False
    result: GenerationResult | None = None
    """Set on the last delta (``finished=True``)."""
    logprobs: list[TokenLogprobs] | None = None
    """With ``SamplingParams.logprobs``: one map per token of ``token_ids``."""
    token_texts: dict[int, str] | None = None
    """The text of each token id in ``logprobs`` (see ``GenerationResult.token_texts``)."""
    index: int = 0
    """Which of its prompt's ``n`` completions it belongs to (``GenerationResult.index``)."""
    routing: Routing | None = None
    """Where the hub sent the request and why: set on a stream's first delta (again on the
    first one from another rank after the request moved); the last delta's ``result`` has
    the final word."""
