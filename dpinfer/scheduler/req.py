"""``Req``: one request's state inside the scheduler (tokens, KV bookkeeping, sampling)."""

from __future__ import annotations

from typing import Any

import torch

from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.runner.radix_cache import TreeNode
from dpinfer.runner.sampler import make_generator
from dpinfer.runner.vision import image_token_positions, mm_inputs_hash
from dpinfer.scheduler.stop import Finish, StopChecker


class Req:
    """A request from admission to finish.

    KV bookkeeping: ``kv_len`` tokens of ``fill_ids`` have KV in the pool; their slots are
    ``req_to_token[req_pool_idx, :kv_len]``. The first ``locked_len`` of them belong to the
    prefix cache (locked through ``last_node``); the rest are owned by this request.
    A retracted request loses all of it and is prefilled again from ``prompt + output``.

    Logprobs: ``output_logprobs`` (one per output token generated here: a continuation's start
    at its first new token, ``output_ids[num_resumed]``) and ``prompt_logprobs`` (one per prompt
    token after the first, filled by the prefill chunks) exist only when the request asks;
    both survive a retraction. While prompt logprobs are missing the prefix cache is not read.

    Images: ``image_positions`` are the prompt positions of its image tokens; their features
    (``image_features``) are computed when a prefill chunk first needs them, sliced per chunk,
    dropped once the last image token is in the pool, and recomputed after a retraction.
    """

    def __init__(
        self,
        request: TokenizedRequest,
        eos_token_ids: tuple[int, ...],
        max_context_len: int,
        image_token_id: int | None = None,
    ) -> None:
        self.request_id = request.request_id
        self.origin_input_ids = list(request.input_ids)
        self.sampling = request.sampling
        self.stream = request.stream
        self.mm_inputs: dict[str, Any] | None = request.mm_inputs or None
        self.mm_hash = request.mm_hash
        self.image_positions: torch.Tensor | None = None
        if self.mm_inputs is not None:
            assert image_token_id is not None, "validated: images only for a vision model"
            self.image_positions = image_token_positions(self.origin_input_ids, image_token_id)
            if self.mm_hash is None:  # never share KV with text or other images
                self.mm_hash = mm_inputs_hash(self.mm_inputs)
        self.image_features: torch.Tensor | None = None
        self.output_ids: list[int] = list(request.resume_ids)
        """Output tokens; a continuation starts with the ones generated before it moved here
        (their logprobs, if asked for, stayed with the stream that delivered them)."""
        self.num_resumed = len(request.resume_ids)
        self.output_logprobs: list[PositionLogprobs] | None = (
            [] if request.sampling.logprobs is not None else None
        )
        self.prompt_logprobs: list[PositionLogprobs] | None = (
            [] if request.sampling.prompt_logprobs is not None else None
        )
        self.stop = StopChecker(request.sampling, eos_token_ids, max_context_len)
        self.generator: torch.Generator | None = (
            None if request.sampling.greedy else make_generator(request.sampling.seed)
        )
        if self.generator is not None and request.resume_ids and request.sampling.seed is not None:
            # A seeded continuation draws on where the moved request stopped: the sampler takes
            # one uniform per generated token, so skip one per resumed token.
            for _ in request.resume_ids:
                torch.rand((), generator=self.generator)
        self.finish: Finish | None = None
        self.num_reported = len(self.output_ids)
        self.cached_len = 0
        self.num_retractions = 0
        self.admitted_once = False
        self.cache_keys = request.cache_keys
        """Routing keys and the prompt tokens each covers (cache-aware routing)."""
        self.cache_keys_done = 0
        """How many of them are tagged in the radix tree (``KVManager``)."""
        self.group = request.group
        """The ``n`` completions of one prompt share its prefill (``parallel.py``)."""
        self.reset_kv()

    def reset_kv(self) -> None:
        """Forget every KV slot (after release or retraction); the next prefill starts over."""
        self.req_pool_idx: int | None = None
        self.kv_len = 0
        self.locked_len = 0
        self.last_node: TreeNode | None = None
        self.extend_len = 0
        """New tokens this request computes in the current extend step."""
        self.image_features = None

    # ------------------------------------------------------------------ tokens

    @property
    def prompt_len(self) -> int:
        return len(self.origin_input_ids)

    @property
    def fill_ids(self) -> list[int]:
        """Tokens whose KV a (re)prefill computes: the prompt, plus output kept across a retraction."""
        return self.origin_input_ids + self.output_ids if self.output_ids else self.origin_input_ids

    @property
    def fill_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def prefill_done(self) -> bool:
        return self.kv_len >= self.fill_len

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still to compute."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len - 1

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.sampling.max_new_tokens - len(self.output_ids))

    # ------------------------------------------------------------------ output

    def append_token(
        self, token_id: int, decoder: Any | None, logprobs: PositionLogprobs | None = None
    ) -> None:
        self.output_ids.append(token_id)
        if self.output_logprobs is not None:
            assert logprobs is not None, "a request that asks for logprobs gets them every step"
            self.output_logprobs.append(logprobs)
        self.finish = self.stop.check(self.prompt_len, self.output_ids, decoder)

    @property
    def num_visible(self) -> int:
        hidden = 1 if self.finish is not None and self.finish.hide_last_token else 0
        return len(self.output_ids) - hidden

    def take_output(self) -> SchedulerOutput | None:
        """The output to send now (``None`` when there is nothing to say yet)."""
        finished = self.finish is not None
        if not finished and not self.stream:
            return None
        start, end = self.num_reported, self.num_visible
        new = self.output_ids[start:end]
        if not new and not finished:
            return None
        self.num_reported = max(self.num_reported, self.num_visible)
        return SchedulerOutput(
            request_id=self.request_id,
            new_token_ids=new,
            finished=finished,
            finish_reason=self.finish.reason.value if self.finish else None,
            matched_stop=self.finish.matched_stop if self.finish else None,
            prompt_len=self.prompt_len,
            cached_len=self.cached_len,
            stop_reason=self.finish.stop_reason if self.finish else None,
            logprobs=self._logprobs(start, end),
            prompt_logprobs=self.prompt_logprobs if finished else None,
        )

    def final_output(self, reason: str, error: str | None = None) -> SchedulerOutput:
        """The last output of a request ended from outside (abort, error)."""
        start = self.num_reported
        new = self.output_ids[start:]
        self.num_reported = len(self.output_ids)
        return SchedulerOutput(
            request_id=self.request_id,
            new_token_ids=new,
            finished=True,
            finish_reason=reason,
            error=error,
            prompt_len=self.prompt_len,
            cached_len=self.cached_len,
            logprobs=self._logprobs(start, len(self.output_ids)),
            prompt_logprobs=self.prompt_logprobs,
        )

    def _logprobs(self, start: int, end: int) -> list[PositionLogprobs] | None:
        """The logprobs of ``output_ids[start:end]`` (none exist for resumed tokens)."""
        if self.output_logprobs is None:
            return None
        resumed = self.num_resumed
        return self.output_logprobs[max(0, start - resumed) : max(0, end - resumed)]

    def __repr__(self) -> str:
        return (
            f"Req(id={self.request_id}, prompt={self.prompt_len}, out={len(self.output_ids)}, "
            f"kv={self.kv_len}, locked={self.locked_len}, row={self.req_pool_idx})"
        )
