"""The in-process Scheduler: continuous batching over one ModelRunner.

Requests flow waiting -> extend (prefill, possibly in chunks) -> running (decode) ->
finished. Each ``step()`` runs one forward pass: an extend step when admission lets any
waiting request in (or a chunked prompt continues), otherwise a decode step over every
running request. When the KV pool cannot hold the next decode step, running requests are
*retracted*: their KV is given back (to the prefix cache when it is on), they return to the
front of the waiting queue with their output so far, and their ``prompt + output`` is
prefilled again later. A prompt that can never fit gets an error output at once.

Not thread-safe: the SchedulerProcess calls every method from its one loop.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.errors import ServiceError
from dpinfer.log import get_logger
from dpinfer.protocol import EngineState, FinishReason, LoadStats
from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.protocol.messages import RankMetrics
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.scheduler.admission import AddResult, PrefillAdder
from dpinfer.scheduler.kv_manager import KVManager
from dpinfer.scheduler.metrics import MetricsRecorder
from dpinfer.scheduler.req import Req
from dpinfer.scheduler.schedule_batch import ScheduleBatch
from dpinfer.scheduler.validation import validate_request

logger = get_logger(__name__)

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.15
NEW_TOKEN_RATIO_DECAY = 0.001
"""Per decode step: the estimate of how much of ``max_new_tokens`` requests really use
relaxes from INIT toward MIN, and jumps back up after a retraction."""


class Scheduler:
    """Continuous batching of ``TokenizedRequest``s on ``runner``; see the module docstring."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig) -> None:
        self.runner = runner
        self.config = config
        self.kv = KVManager(runner, config.enable_radix_cache)
        self.max_context_len: int = runner.max_context_len
        self.eos_token_ids = runner.spec.eos_token_ids
        self.waiting: deque[Req] = deque()
        self.running: ScheduleBatch | None = None
        self.chunked_req: Req | None = None
        self.reqs: dict[int, Req] = {}
        self.state = EngineState.RUNNING
        """The rank's lifecycle state: this is its only owner (the rank main mirrors the acks)."""
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self.recorder = MetricsRecorder()
        """Every request's figures (``metrics()``): arrival, first scheduled, tokens, finish."""
        self._tokenizer: Any | None = None

    @classmethod
    def from_config(cls, model: ModelConfig, config: SchedulerConfig) -> Scheduler:
        return cls(ModelRunner(model, config), config)

    # ------------------------------------------------------------------ requests

    def add_request(self, req: TokenizedRequest) -> list[SchedulerOutput]:
        """Queue ``req``; a request that can never run gets an error output instead."""
        error = validate_request(req, self.runner, self.reqs, self.max_context_len, self._stop_decoder)
        if error is not None:
            logger.info("request %s rejected: %s", req.request_id, error)
            self.recorder.rejected()
            return [SchedulerOutput.for_error(req.request_id, len(req.input_ids), error)]
        self.reqs[req.request_id] = r = Req(
            req, self.eos_token_ids, self.max_context_len, self.runner.spec.image_token_id
        )
        self.waiting.append(r)
        self.recorder.arrived(req.request_id, time.monotonic())
        return []

    def _stop_decoder(self) -> Any:
        if self._tokenizer is None:
            from dpinfer.runner.registry import load_tokenizer

            self._tokenizer = load_tokenizer(self.runner.model_config)
        return self._tokenizer

    def _decoder_for(self, req: Req) -> Any | None:
        return self._tokenizer if req.stop.stop_strings else None

    def abort_request(self, request_id: int) -> list[SchedulerOutput]:
        """End a waiting or running request; its slots are freed. Unknown ids are ignored."""
        req = self.reqs.get(request_id)
        if req is None:
            return []
        self._detach(req)
        self._finish(req, FinishReason.ABORT.value, time.monotonic())
        return [req.final_output(FinishReason.ABORT.value, "aborted")]

    def abort_all(self, reason: str) -> list[SchedulerOutput]:
        """End every request (e.g. on STOP); each gets a final ``abort`` output with ``reason``."""
        outputs = []
        now = time.monotonic()
        for req in list(self.reqs.values()):
            self._detach(req)
            self._finish(req, FinishReason.ABORT.value, now)
            outputs.append(req.final_output(FinishReason.ABORT.value, reason))
        return outputs

    def _detach(self, req: Req) -> None:
        """Take ``req`` out of whichever queue or batch holds it."""
        if req is self.chunked_req:
            self.chunked_req = None
        elif self.running is not None and req in self.running.reqs:
            self.running.filter([i for i, r in enumerate(self.running.reqs) if r is not req])
            if not self.running.reqs:
                self.running = None
        else:
            self.waiting.remove(req)

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

    def _finish(self, req: Req, reason: str, now: float) -> None:
        self.kv.release(req)
        del self.reqs[req.request_id]
        self.recorder.finished_request(req.request_id, reason, now)

    # ------------------------------------------------------------------ lifecycle

    @property
    def paused(self) -> bool:
        """Paused or suspended: nothing is scheduled."""
        return self.state in (EngineState.PAUSED, EngineState.SUSPENDED)

    def pause(self) -> None:
        """Stop scheduling; every request keeps its state and KV."""
        self.state = EngineState.PAUSED

    def unpause(self) -> None:
        self.state = EngineState.RUNNING

    def suspend(self) -> None:
        """Give back the KV pool memory: running requests are retracted (output kept), the
        prefix cache is dropped. Nothing is scheduled until ``resume``."""
        self._retract_all()
        self.kv.reset()
        self.runner.release_kv()
        self.state = EngineState.SUSPENDED

    def resume(self) -> None:
        """Re-create the KV pool; retracted requests are recomputed when scheduling resumes."""
        self.runner.allocate_kv()
        self.state = EngineState.PAUSED

    def update_weights(self, path: str) -> None:
        """Load new weights (HF directory or safetensors file) into the model; only while paused.

        Running requests are retracted (their KV came from the old weights) and the prefix
        cache is dropped. Raises ``ServiceError`` when not paused and ``ConfigError`` for a
        checkpoint that does not match the model (which is then left unchanged).
        """
        if not self.paused:
            raise ServiceError("update_weights needs the engine paused first", code="invalid_state")
        self.runner.load_weights(path)
        self._retract_all()
        self.kv.reset()

    def _retract_all(self) -> None:
        victims = ([self.chunked_req] if self.chunked_req else []) + (
            self.running.reqs if self.running else []
        )
        for req in reversed(victims):
            self._retract(req)
        self.chunked_req, self.running = None, None

    def _retract(self, req: Req) -> None:
        self.kv.release(req)
        req.num_retractions += 1
        self.num_retractions += 1
        self.recorder.retracted()
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ state

    @property
    def has_work(self) -> bool:
        """Whether ``step()`` would do something now (False while paused or suspended)."""
        if self.paused:
            return False
        return bool(self.waiting) or self.running is not None or self.chunked_req is not None

    def load(self) -> LoadStats:
        num_running = (len(self.running) if self.running else 0) + (1 if self.chunked_req else 0)
        available = self.kv.available
        return LoadStats(
            num_waiting=len(self.waiting),
            num_running=num_running,
            kv_used_tokens=self.kv.num_slots - available,
            kv_free_tokens=available,
            kv_capacity_tokens=self.kv.num_slots,
        )

    def metrics(self) -> RankMetrics:
        """The rank's request figures so far (cumulative; see ``protocol.RankMetrics``)."""
        return self.recorder.snapshot()

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[SchedulerOutput]:
        """One forward pass: an extend step if any request can be admitted, else a decode step."""
        if not self.has_work:
            return []
        batch = self._schedule_prefill()
        if batch is not None:
            return self._run_extend(batch)
        if self.running is not None:
            return self._run_decode()
        return []

    def _schedule_prefill(self) -> ScheduleBatch | None:
        if not self.waiting and self.chunked_req is None:
            return None
        adder = PrefillAdder(
            self.kv,
            self.running.reqs if self.running else [],
            self.config.max_prefill_tokens,
            self.config.max_running_requests,
            self.new_token_ratio,
        )
        if self.chunked_req is not None:
            adder.add_chunked(self.chunked_req)
        deferred: list[Req] = []
        while self.waiting:
            result = adder.add_one(self.waiting[0])
            if result is AddResult.NO_ROOM:
                break
            req = self.waiting.popleft()
            if result is AddResult.DEFERRED:
                deferred.append(req)
        self.waiting.extendleft(reversed(deferred))
        if adder.new_chunked is not None:
            self.chunked_req = adder.new_chunked
        now = time.monotonic()
        for req in adder.reqs:
            self.recorder.scheduled(req.request_id, req.prompt_len, req.cached_len, now)
        return ScheduleBatch(adder.reqs, self.runner) if adder.reqs else None

    def _run_extend(self, batch: ScheduleBatch) -> list[SchedulerOutput]:
        logits = batch.take_prompt_logprobs(self.runner.forward(batch.prepare_for_extend()))
        for req in batch.reqs:
            req.kv_len += req.extend_len
            req.extend_len = 0
        if self.chunked_req is not None and self.chunked_req.prefill_done:
            self.chunked_req = None
        if self.chunked_req is not None:
            self.kv.cache_unfinished(self.chunked_req)
        outputs: list[SchedulerOutput] = []
        if not batch.sampling_reqs:
            return outputs
        assert batch.sampling is not None
        next_ids = self.runner.sample(logits, batch.sampling)
        logprobs = self.runner.logprobs(logits, batch.sampling, next_ids)
        tokens: list[int] = next_ids.tolist()
        now = time.monotonic()
        joining: list[int] = []
        for i, (req, token) in enumerate(zip(batch.sampling_reqs, tokens, strict=True)):
            if not self._accept_token(req, token, outputs, now, logprobs[i] if logprobs else None):
                self.kv.cache_unfinished(req)
                joining.append(i)
        if joining:
            reqs = [batch.sampling_reqs[i] for i in joining]
            new = ScheduleBatch.start_decoding(reqs, next_ids[joining], self.runner)
            if self.running is None:
                self.running = new
            else:
                self.running.merge(new)
        return outputs

    def _run_decode(self) -> list[SchedulerOutput]:
        self._make_room_for_decode()
        running = self.running
        assert running is not None
        slots = self.kv.alloc_slots(len(running))
        assert slots is not None, "decode room was made"
        logits = self.runner.forward(running.prepare_for_decode(slots))
        assert running.sampling is not None
        next_ids = self.runner.sample(logits, running.sampling)
        logprobs = self.runner.logprobs(logits, running.sampling, next_ids)
        running.input_ids = next_ids
        tokens: list[int] = next_ids.tolist()
        now = time.monotonic()
        outputs: list[SchedulerOutput] = []
        keep: list[int] = []
        for i, (req, token) in enumerate(zip(running.reqs, tokens, strict=True)):
            req.kv_len += 1
            if not self._accept_token(req, token, outputs, now, logprobs[i] if logprobs else None):
                keep.append(i)
        running.filter(keep)
        if not running.reqs:
            self.running = None
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return outputs

    def _make_room_for_decode(self) -> None:
        """Retract requests until the pool holds one more token for each running request.

        The chunked prefill goes first, then the requests with the least output (ties: the
        longest prompt). The last request is never retracted: alone, it always fits.
        """
        running = self.running
        assert running is not None
        if self.kv.available >= len(running):
            return
        if self.chunked_req is not None:
            self._retract(self.chunked_req)
            self.chunked_req = None
        while self.kv.available < len(running) and len(running) > 1:
            victim = min(
                range(len(running)),
                key=lambda i: (len(running.reqs[i].output_ids), -running.reqs[i].prompt_len),
            )
            req = running.reqs[victim]
            running.filter([i for i in range(len(running)) if i != victim])
            self._retract(req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        logger.info("KV pool full: retracted down to %d running requests", len(running))
