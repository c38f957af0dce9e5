"""The in-process Scheduler on tiny-llama: stop conditions, abort, lifecycle, errors, caching."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

MAX_STEPS = 2000
PROMPTS = [[(7 * i + 13 * j) % 250 + 3 for j in range(10 + 9 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=4096, max_running_requests=16))


def new_scheduler(runner: ModelRunner, **kwargs: object) -> Scheduler:
    settings: dict[str, object] = {"max_kv_tokens": 4096, "max_running_requests": 16, **kwargs}
    return Scheduler(runner, SchedulerConfig(**settings))  # type: ignore[arg-type]


def greedy(n: int = 24, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kwargs)  # type: ignore[arg-type]


class Collector:
    """Accumulates outputs per request; ``run`` steps until every request finished."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.tokens: dict[int, list[int]] = {}
        self.final: dict[int, SchedulerOutput] = {}

    def feed(self, outputs: list[SchedulerOutput]) -> None:
        for out in outputs:
            assert out.request_id not in self.final, "no output after the final one"
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                self.final[out.request_id] = out

    def add(self, rid: int, prompt: list[int], params: SamplingParams, **kwargs: object) -> None:
        self.feed(self.s.add_request(TokenizedRequest(rid, prompt, params, stream=True, **kwargs)))  # type: ignore[arg-type]

    def run(self, until: Callable[[], bool] | None = None, check: bool = True) -> None:
        for _ in range(MAX_STEPS):
            if until() if until else not self.s.has_work:
                return
            self.feed(self.s.step())
            if check:
                self.s.kv.check_invariants(list(self.s.reqs.values()))
        raise AssertionError("scheduler did not finish within MAX_STEPS")


def generate(runner: ModelRunner, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    c = Collector(new_scheduler(runner))
    for i, p in enumerate(prompts):
        c.add(i, p, params)
    c.run()
    return [c.tokens[i] for i in range(len(prompts))]


def test_max_new_tokens_gives_length(runner: ModelRunner) -> None:
    c = Collector(new_scheduler(runner))
    c.add(1, PROMPTS[0], greedy(7))
    c.run()
    assert len(c.tokens[1]) == 7
    assert c.final[1].finish_reason == "length" and c.final[1].prompt_len == len(PROMPTS[0])


def test_stop_token_ends_and_is_not_output(runner: ModelRunner) -> None:
    full = generate(runner, [PROMPTS[1]], greedy(24))[0]
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    c = Collector(new_scheduler(runner))
    c.add(1, PROMPTS[1], greedy(24, stop_token_ids=(full[k],)))
    c.run()
    assert c.tokens[1] == full[:k]
    assert c.final[1].finish_reason == "stop" and c.final[1].matched_stop == full[k]


def test_eos_stops_unless_ignore_eos(runner: ModelRunner) -> None:
    full = generate(runner, [PROMPTS[2]], greedy(24))[0]
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    s = new_scheduler(runner)
    s.eos_token_ids = (full[k],)  # pretend this token is the model's EOS
    c = Collector(s)
    c.add(1, PROMPTS[2], greedy(24))
    c.add(2, PROMPTS[2], greedy(24, ignore_eos=True))
    c.run()
    assert c.tokens[1] == full[:k] and c.final[1].matched_stop == full[k]
    assert c.tokens[2] == full and c.final[2].finish_reason == "length"


def test_stop_string_ends_on_the_token_that_completes_it(runner: ModelRunner) -> None:
    full = generate(runner, [PROMPTS[3]], greedy(32))[0]
    s = new_scheduler(runner)  # after generate(): a new scheduler takes over the runner's pool
    tok = s._stop_decoder()
    text = tok.decode(full, skip_special_tokens=True)
    assert len(text) >= 6
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    k = next(n for n in range(1, len(full) + 1) if stop in tok.decode(full[:n], skip_special_tokens=True))
    c = Collector(s)
    c.add(1, PROMPTS[3], greedy(32, stop=(stop, "\x00never")))
    c.run()
    assert c.final[1].finish_reason == "stop" and c.final[1].matched_stop == stop
    assert c.tokens[1] == full[:k]


def test_non_stream_requests_get_one_output_with_everything(runner: ModelRunner) -> None:
    s = new_scheduler(runner)
    s.add_request(TokenizedRequest(5, PROMPTS[0], greedy(6), stream=False))
    outputs = []
    while s.has_work:
        outputs += s.step()
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].new_token_ids) == 6


def test_abort_waiting_and_running_frees_everything(runner: ModelRunner) -> None:
    s = new_scheduler(runner, max_running_requests=2)
    c = Collector(s)
    for i in range(4):
        c.add(i, PROMPTS[i], greedy(50))
    for _ in range(4):
        c.feed(s.step())
    running = [r.request_id for r in s.running.reqs] if s.running else []
    waiting = [r.request_id for r in s.waiting]
    assert running and waiting
    c.feed(s.abort_request(running[0]))
    c.feed(s.abort_request(waiting[0]))
    assert s.abort_request(12345) == [], "unknown ids are ignored"
    for rid in (running[0], waiting[0]):
        assert c.final[rid].finish_reason == "abort"
    assert len(c.tokens[running[0]]) > 0, "tokens generated before the abort are kept"
    s.kv.check_invariants(list(s.reqs.values()))
    c.run()
    assert len(c.final) == 4
    assert s.load().kv_used_tokens == 0, "cached prefixes are evictable, nothing is held"


def test_abort_all_ends_every_request(runner: ModelRunner) -> None:
    s = new_scheduler(runner)
    c = Collector(s)
    for i in range(3):
        c.add(i, PROMPTS[i], greedy(30))
    c.feed(s.step())
    c.feed(s.abort_all("engine stopping"))
    assert {o.finish_reason for o in c.final.values()} == {"abort"}
    assert all(o.error == "engine stopping" for o in c.final.values())
    assert not s.has_work and s.load().num_running == 0


def test_pause_suspend_resume_keep_outputs_identical(runner: ModelRunner) -> None:
    expected = generate(runner, PROMPTS[:4], greedy(20))
    s = new_scheduler(runner)
    c = Collector(s)
    for i in range(4):
        c.add(i, PROMPTS[i], greedy(20))
    for _ in range(5):
        c.feed(s.step())
    s.pause()
    assert not s.has_work and s.step() == []
    c.add(9, PROMPTS[5], greedy(3))  # accepted while paused
    s.suspend()
    assert not runner.kv_pool.allocated
    assert s.load().kv_used_tokens == 0 and s.load().num_waiting == 5
    s.resume()
    assert runner.kv_pool.allocated and not s.has_work, "resume returns to paused"
    s.unpause()
    c.run()
    assert [c.tokens[i] for i in range(4)] == expected
    assert len(c.tokens[9]) == 3


def test_prompt_that_can_never_fit_gets_an_error() -> None:
    small = ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=64, max_running_requests=4))
    s = Scheduler(small, SchedulerConfig(max_kv_tokens=64, max_running_requests=4))
    assert s.max_context_len == 64
    out = s.add_request(TokenizedRequest(1, list(range(3, 67)), greedy(4)))
    assert out and out[0].finished and out[0].finish_reason == "error" and "64" in (out[0].error or "")
    c = Collector(s)
    c.add(2, list(range(3, 53)), greedy(100))
    c.run()
    assert c.final[2].finish_reason == "length" and len(c.tokens[2]) == 14, "stops at the pool size"


@pytest.mark.parametrize(
    ("prompt", "why"),
    [([], "empty prompt"), ([3, 999999], "token ids"), ([3, -1], "token ids")],
)
def test_invalid_prompts_are_internal_invariants(runner: ModelRunner, prompt: list[int], why: str) -> None:
    """The tokenizer rejects these with an error reply (tests/test_bad_input.py); reaching the
    scheduler with one is a bug, asserted, and leaves nothing queued."""
    s = new_scheduler(runner)
    with pytest.raises(AssertionError, match=why):
        s.add_request(TokenizedRequest(1, prompt, greedy(4)))
    assert not s.has_work and not s.reqs


def test_duplicate_request_id_is_an_error(runner: ModelRunner) -> None:
    s = new_scheduler(runner)
    assert s.add_request(TokenizedRequest(1, [3, 4], greedy(4))) == []
    out = s.add_request(TokenizedRequest(1, [3, 4], greedy(4)))
    assert out[0].finish_reason == "error" and "already" in (out[0].error or "")


def test_prefix_hits_are_reported_and_namespaced_by_mm_hash(runner: ModelRunner) -> None:
    s = new_scheduler(runner)
    c = Collector(s)
    prefix = PROMPTS[4]
    c.add(1, [*prefix, 5, 6], greedy(4))
    c.run()
    c.add(2, [*prefix, 7, 8], greedy(4))
    c.add(3, [*prefix, 7, 8], greedy(4), mm_hash=b"image-1")
    c.run()
    c.add(4, [*prefix, 9], greedy(4), mm_hash=b"image-1")
    c.add(5, [*prefix, 9], greedy(4), mm_hash=b"image-2")
    c.run()
    assert c.final[1].cached_len == 0
    assert c.final[2].cached_len >= len(prefix)
    assert c.final[3].cached_len == 0, "another image never shares KV"
    assert c.final[4].cached_len >= len(prefix), "same image hash shares"
    assert c.final[5].cached_len == 0


def test_seeded_sampling_is_independent_of_batch(runner: ModelRunner) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = generate(runner, [PROMPTS[2]], params)[0]
    c = Collector(new_scheduler(runner))
    c.add(0, PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.8))
    c.add(1, PROMPTS[1], greedy(20))
    c.add(2, PROMPTS[2], params)
    c.run()
    assert c.tokens[2] == alone
    other_seed = generate(runner, [PROMPTS[2]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))[0]
    assert other_seed != alone


def test_load_report_counts(runner: ModelRunner) -> None:
    s = new_scheduler(runner, max_running_requests=2)
    for i in range(3):
        s.add_request(TokenizedRequest(i, PROMPTS[i], greedy(10)))
    assert s.load().num_waiting == 3 and s.load().kv_used_tokens == 0
    s.step()
    report = s.load()
    assert report.num_running == 2 and report.num_waiting == 1
    assert report.kv_used_tokens >= len(PROMPTS[0]) + len(PROMPTS[1])
    assert report.kv_used_tokens + report.kv_free_tokens == report.kv_capacity_tokens == 4096


@pytest.mark.parametrize("seed", [None, 1234])
def test_a_continuation_goes_on_where_the_moved_request_stopped(
    runner: ModelRunner, seed: int | None
) -> None:
    # Migration: prompt + the tokens generated elsewhere, prefilled at once, then decoding on.
    # Greedy, and seeded sampling (the generator skips one draw per resumed token), give the
    # undisturbed tokens; the continuation reports only what follows, counted against the limit.
    params = greedy(20) if seed is None else SamplingParams(max_new_tokens=20, temperature=0.9, seed=seed)
    (whole,) = generate(runner, [PROMPTS[2]], params)
    for cut in (1, 7, 19):
        c = Collector(new_scheduler(runner))
        c.add(1, PROMPTS[2], params, resume_ids=tuple(whole[:cut]))
        c.run()
        assert c.tokens[1] == whole[cut:], cut
        assert c.final[1].finish_reason == "length" and c.final[1].prompt_len == len(PROMPTS[2])
