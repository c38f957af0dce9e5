"""The in-process Scheduler: continuous batching over one ModelRunner.

Requests flow waiting -> extend (prefill, possibly in chunks) -> running (decode) ->
finished. Each ``step()`` runs one forward pass, composed under one token budget
(``SchedulerConfig.max_prefill_tokens``), as SGLang's mixed chunked prefill and vLLM v1's
unified token budget do:

1. *decodes first*: every running request's next token (one slot each; when the KV pool
   cannot hold them, running requests are retracted first, see below);
2. *then prompt chunks*: admission (``admission.py``) fills what is left of the budget with
   the continued chunked prompt, then waiting requests in order, cutting the last one into
   a chunk when it does not fit whole.

Both parts run in one mixed pass (``ForwardMode.MIXED``: decode tokens first in the
flattened batch), so a long prompt never freezes the streams already running; a step with
only one part is a plain decode or extend pass. When the decodes fill the budget, no prompt
is prefilled that step. Requests whose prompt completes sample their first token and join
the running batch for the next step. With ``mixed_steps=False`` a step is either an extend
pass (whenever admission lets something in) or a decode pass, the older alternation.

When the KV pool cannot hold the next decode tokens, running requests are *retracted*:
their KV is given back (to the prefix cache when it is on), they return to the front of the
waiting queue with their output so far, and their ``prompt + output`` is prefilled again
later. A prompt that can never fit gets an error output at once. Not thread-safe: the
SchedulerProcess calls every method from its one loop.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import torch

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.errors import ServiceError
from dpinfer.log import get_logger
from dpinfer.protocol import EngineState, FinishReason, LoadStats
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.protocol.messages import RankMetrics
from dpinfer.runner.attention import ForwardMode, mixed_forward_batch
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.scheduler.admission import AddResult, PrefillAdder
from dpinfer.scheduler.kv_manager import KVManager
from dpinfer.scheduler.metrics import MetricsRecorder
from dpinfer.scheduler.output_processor import OutputProcessor
from dpinfer.scheduler.parallel import ParallelGroups
from dpinfer.scheduler.req import Req
from dpinfer.scheduler.schedule_batch import ScheduleBatch
from dpinfer.scheduler.validation import validate_request

logger = get_logger(__name__)

INIT_NEW_TOKEN_RATIO = 0.7
"""The first estimate of how much of ``max_new_tokens`` requests really use (admission's
reservations); it relaxes each decode step (``output_processor``) and jumps after a retraction."""


class Scheduler(OutputProcessor):
    """Continuous batching of ``TokenizedRequest``s on ``runner``; see the module docstring."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig) -> None:
        self.runner = runner
        self.config = config
        self.kv = KVManager(runner, config.enable_radix_cache)
        self.parallel = ParallelGroups(config.enable_radix_cache)
        """``n > 1``: members of a group wait for their leader's prefill, then fork from it."""
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
        self.steps_by_mode: Counter[ForwardMode] = Counter()
        """Forward passes run, by composition: decode, extend, or mixed (both in one pass)."""
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
        self.parallel.add(r)
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

    def _finish(self, req: Req, reason: str, now: float) -> None:
        self.kv.release(req)
        self.parallel.discard(req)
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
        """One forward pass; its composition is described in the module docstring."""
        if not self.has_work:
            return []
        if self.parallel.late:  # group members that can fork from their running leader
            return self._fork_late(time.monotonic()) + self._step()
        return self._step()

    def _step(self) -> list[SchedulerOutput]:
        budget = self.config.max_prefill_tokens
        if not self.config.mixed_steps:
            extend = self._schedule_prefill(budget)
            if extend is not None:
                return self._run(extend, None)
            return self._run(None, self._reserve_decode()) if self.running is not None else []
        slots = self._reserve_decode() if self.running is not None else None
        num_decode = len(slots) if slots is not None else 0
        extend = self._schedule_prefill(budget - num_decode) if budget > num_decode else None
        if extend is None and slots is None:
            return []
        return self._run(extend, slots)

    def _schedule_prefill(self, budget: int) -> ScheduleBatch | None:
        """Admit prompt chunks of at most ``budget`` tokens in all (the continued chunked
        request first, then the waiting queue in order); their slots are allocated."""
        if not self.waiting and self.chunked_req is None:
            return None
        adder = PrefillAdder(
            self.kv,
            self.running.reqs if self.running else [],
            budget,
            self.config.max_running_requests,
            self.new_token_ratio,
        )
        if self.chunked_req is not None:
            adder.add_chunked(self.chunked_req)
        deferred: list[Req] = []
        while self.waiting:
            held = self.parallel.held(self.waiting[0])  # waits for its group's leader
            result = AddResult.DEFERRED if held else adder.add_one(self.waiting[0])
            if result is AddResult.NO_ROOM:
                break
            req = self.waiting.popleft()
            if result is AddResult.DEFERRED:
                deferred.append(req)
            else:
                self.parallel.admitted(req)
        self.waiting.extendleft(reversed(deferred))
        if adder.new_chunked is not None:
            self.chunked_req = adder.new_chunked
        now = time.monotonic()
        for req in adder.reqs:
            self.recorder.scheduled(req.request_id, req.prompt_len, req.cached_len, now)
        return ScheduleBatch(adder.reqs, self.runner) if adder.reqs else None

    def _reserve_decode(self) -> torch.Tensor:
        """One new slot per running request (retracting requests first if the pool is short)."""
        self._make_room_for_decode()
        assert self.running is not None
        slots = self.kv.alloc_slots(len(self.running))
        assert slots is not None, "decode room was made"
        return slots

    def _run(self, extend: ScheduleBatch | None, decode_slots: torch.Tensor | None) -> list[SchedulerOutput]:
        """Run one forward pass over the running batch's decode tokens (when ``decode_slots``
        is given) followed by ``extend``'s prompt chunks, then take every sampled token."""
        running = self.running if decode_slots is not None else None
        decode = None
        if running is not None:
            assert decode_slots is not None
            decode = running.prepare_for_decode(decode_slots)
        prefill = extend.prepare_for_extend() if extend is not None else None
        if decode is not None and prefill is not None:
            batch = mixed_forward_batch(decode, prefill)
        else:
            either = decode or prefill
            assert either is not None, "a step computes something"
            batch = either
        self.steps_by_mode[batch.mode] += 1
        logits = self.runner.forward(batch)
        outputs: list[SchedulerOutput] = []
        now = time.monotonic()
        num_decode = 0
        if running is not None:
            num_decode = len(running)
            self._finish_decode(running, logits[:num_decode], outputs, now)
        if extend is not None:
            self._finish_extend(extend, logits[num_decode:], outputs, now)
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
