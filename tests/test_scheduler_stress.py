"""A seeded random workload on a tiny pool: arrivals, aborts, pauses, suspends, sampling.

Every step the slot-ownership invariant must hold; every request must end exactly once.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

POOL = 160


@pytest.mark.parametrize("radix", [True, False], ids=["radix", "no_radix"])
def test_random_workload_keeps_invariants(radix: bool) -> None:
    torch.set_num_threads(1)
    rng = random.Random(11)
    config = SchedulerConfig(
        max_kv_tokens=POOL, max_running_requests=6, max_prefill_tokens=40, enable_radix_cache=radix
    )
    s = Scheduler(ModelRunner(ModelConfig(), config), config)
    shared = [rng.randrange(3, 259) for _ in range(50)]
    finals: dict[int, str] = {}
    next_id, num_errors = 0, 0
    for _ in range(400):
        if next_id < 60 and rng.random() < 0.4:
            prompt = shared[: rng.randrange(0, 50)] + [
                rng.randrange(3, 259) for _ in range(rng.randrange(1, 90))
            ]
            if next_id % 10 == 9:
                prompt = [5] * POOL  # can never fit
            params = SamplingParams(
                max_new_tokens=rng.randrange(1, 40),
                temperature=rng.choice([0.0, 0.8]),
                top_k=rng.choice([0, 5]),
                seed=rng.choice([None, 3]),
            )
            for out in s.add_request(TokenizedRequest(next_id, prompt, params, stream=rng.random() < 0.5)):
                finals[out.request_id] = out.finish_reason or ""
                num_errors += 1
            next_id += 1
        roll = rng.random()
        if roll < 0.05 and s.reqs:
            for out in s.abort_request(rng.choice(list(s.reqs))):
                finals[out.request_id] = out.finish_reason or ""
        elif roll < 0.07:
            s.pause()
            if rng.random() < 0.5:
                s.suspend()
                s.resume()
            s.unpause()
        for out in s.step():
            if out.finished:
                assert out.request_id not in finals, "one final output per request"
                finals[out.request_id] = out.finish_reason or ""
        s.kv.check_invariants(list(s.reqs.values()))
    for _ in range(2000):
        if not s.has_work:
            break
        for out in s.step():
            if out.finished:
                finals[out.request_id] = out.finish_reason or ""
        s.kv.check_invariants(list(s.reqs.values()))
    assert sorted(finals) == list(range(next_id)), "every request ended"
    assert set(finals.values()) <= {"stop", "length", "abort", "error"}
    assert num_errors == sum(v == "error" for v in finals.values())
    assert s.load().kv_used_tokens == 0 and not s.reqs
    assert s.num_retractions > 0, "the pool was small enough to retract"
    assert num_errors > 0, "some prompts were too long for the pool"
