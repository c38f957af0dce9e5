"""``OutputProcessor``: what a forward pass's logits become (a mixin of ``Scheduler``).

After each pass (``Scheduler._run``) the decode rows give every running request its next
token, and the extend rows give a first token to each request whose prompt completed there;
prompt logprobs are split off first. Group members waiting for such a request fork from it
and sample their first token from its logits (``parallel.py``); members that arrive later
fork at the start of a step (``_fork_late``). Each token is checked
against the stop conditions; a request that finishes is released, the others join (or stay
in) the running batch. SGLang keeps the same split (``SchedulerOutputProcessorMixin``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from dpinfer.config import SchedulerConfig
from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.protocol.local import SchedulerOutput
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.runner.sampler import SamplingInfo
from dpinfer.scheduler.kv_manager import KVManager
from dpinfer.scheduler.metrics import MetricsRecorder
from dpinfer.scheduler.parallel import ParallelGroups
from dpinfer.scheduler.req import Req
from dpinfer.scheduler.schedule_batch import ScheduleBatch, build_sampling_info

MIN_NEW_TOKEN_RATIO = 0.15
NEW_TOKEN_RATIO_DECAY = 0.001
"""Per decode step: the estimate of how much of ``max_new_tokens`` requests really use
relaxes from ``INIT_NEW_TOKEN_RATIO`` toward MIN, and jumps back up after a retraction."""


class OutputProcessor:
    """Turns sampled logits into tokens, outputs and batch membership (see the module)."""

    runner: ModelRunner
    config: SchedulerConfig
    kv: KVManager
    parallel: ParallelGroups
    recorder: MetricsRecorder
    waiting: deque[Req]
    running: ScheduleBatch | None
    chunked_req: Req | None
    new_token_ratio: float

    def _finish(self, req: Req, reason: str, now: float) -> None:
        raise NotImplementedError

    def _decoder_for(self, req: Req) -> Any | None:
        raise NotImplementedError

    def _accept_token(
        self,
        req: Req,
        token: int,
        outputs: list[SchedulerOutput],
        now: float,
        logprobs: PositionLogprobs | None = None,
    ) -> bool:
        """Append a sampled token (and its logprobs, if asked), collect the request's output;
        True if it just finished."""
        self.recorder.token(req.request_id, now)
        req.append_token(token, self._decoder_for(req), logprobs)
        out = req.take_output()
        if out is not None:
            outputs.append(out)
        if req.finish is None:
            return False
        self._finish(req, req.finish.reason.value, now)
        return True

    def _finish_decode(
        self, running: ScheduleBatch, logits: torch.Tensor, outputs: list[SchedulerOutput], now: float
    ) -> None:
        assert running.sampling is not None
        next_ids = self.runner.sample(logits, running.sampling)
        logprobs = self.runner.logprobs(logits, running.sampling, next_ids)
        running.input_ids = next_ids
        keep: list[int] = []
        for i, (req, token) in enumerate(zip(running.reqs, next_ids.tolist(), strict=True)):
            req.kv_len += 1
            if not self._accept_token(req, token, outputs, now, logprobs[i] if logprobs else None):
                keep.append(i)
        running.filter(keep)
        if not running.reqs:
            self.running = None
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)

    def _finish_extend(
        self, batch: ScheduleBatch, logits: torch.Tensor, outputs: list[SchedulerOutput], now: float
    ) -> None:
        logits = batch.take_prompt_logprobs(logits)
        for req in batch.reqs:
            req.kv_len += req.extend_len
            req.extend_len = 0
        if self.chunked_req is not None and self.chunked_req.prefill_done:
            self.chunked_req = None
        if self.chunked_req is not None:
            self.kv.cache_unfinished(self.chunked_req)
        if not batch.sampling_reqs:
            return
        # Group members fork from a leader whose prompt completed (parallel.py): they sample
        # their first token from its logits, and join the running batch with it.
        room = self.config.max_running_requests - len(self.running or ()) - len(batch.sampling_reqs)
        sampling_reqs, logits = self.parallel.fork(batch.sampling_reqs, logits, self.kv, room)
        self._forked(sampling_reqs[len(batch.sampling_reqs) :], now)
        sampling = batch.sampling if sampling_reqs is batch.sampling_reqs else None
        self._sample_first(sampling_reqs, logits, sampling, outputs, now)

    def _fork_late(self, now: float) -> list[SchedulerOutput]:
        """Members that reached the scheduler after their leader's prompt was in fork from it
        now, before this step's decodes are counted (``parallel.py``)."""
        room = self.config.max_running_requests - len(self.running or ()) - (1 if self.chunked_req else 0)
        reqs, logits = self.parallel.fork_late(self.kv, room)
        if logits is None:
            return []
        self._forked(reqs, now)
        outputs: list[SchedulerOutput] = []
        self._sample_first(reqs, logits, None, outputs, now)
        return outputs

    def _forked(self, reqs: list[Req], now: float) -> None:
        """``reqs`` forked from their leader: out of the waiting queue, and scheduled now."""
        for req in reqs:
            self.waiting.remove(req)
            self.recorder.scheduled(req.request_id, req.prompt_len, req.cached_len, now)

    def _sample_first(
        self, reqs: list[Req], logits: torch.Tensor, sampling: SamplingInfo | None,
        outputs: list[SchedulerOutput], now: float,
    ) -> None:  # fmt: skip
        """Sample the first token of ``reqs`` (prompt complete) from ``logits``; those that go
        on join the running batch."""
        sampling = sampling or build_sampling_info(reqs, self.runner)
        next_ids = self.runner.sample(logits, sampling)
        logprobs = self.runner.logprobs(logits, sampling, next_ids)
        joining: list[int] = []
        for i, (req, token) in enumerate(zip(reqs, next_ids.tolist(), strict=True)):
            if not self._accept_token(req, token, outputs, now, logprobs[i] if logprobs else None):
                self.kv.cache_unfinished(req)
                joining.append(i)
        if joining:
            new = ScheduleBatch.start_decoding([reqs[i] for i in joining], next_ids[joining], self.runner)
            if self.running is None:
                self.running = new
            else:
                self.running.merge(new)
