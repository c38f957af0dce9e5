"""Parallel sampling in the Scheduler (``n`` completions as one group, ``scheduler/parallel.py``).

The group's prompt is prefilled once (every other member forks from the leader's KV and
logits), seeded groups are reproducible and their members differ, greedy members equal a
single greedy run, and every way a group can come apart (no radix cache, different prompts
under one group id, a full running batch, the leader aborted mid-prefill, continuations)
still ends every request with its own tokens and leaves no slot behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from test_scheduler import Collector

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.runner.attention import ForwardBatch
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

MAX_STEPS = 2000
PROMPT = [(7 * j) % 240 + 5 for j in range(45)]
OTHER = [(13 * j) % 240 + 6 for j in range(30)]


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=4096, max_running_requests=16))


class Run(Collector):
    """A scheduler on ``runner`` that counts the prompt tokens each forward pass computes."""

    def __init__(self, runner: ModelRunner, **config: object) -> None:
        settings: dict[str, object] = {"max_kv_tokens": 4096, "max_running_requests": 16, **config}
        super().__init__(Scheduler(runner, SchedulerConfig(**settings)))  # type: ignore[arg-type]
        self.prefilled = 0
        forward = runner.forward

        def counting(batch: ForwardBatch) -> torch.Tensor:
            self.prefilled += sum(seq.q_len for seq in batch.extend_seqs)
            return forward(batch)

        self.s.runner = _Counting(runner, counting)  # type: ignore[assignment]

    def group(self, first_id: int, prompt: list[int], params: SamplingParams, group: int = 1) -> list[int]:
        ids = []
        for j, one in enumerate(params.completions()):
            self.add(first_id + j, prompt, one, group=group)
            ids.append(first_id + j)
        return ids

    def run(self, until: Callable[[], bool] | None = None, check: bool = True) -> Run:
        super().run(until, check)
        return self

    def done(self) -> None:
        """Every slot is back (free or in the tree, unlocked), and no group is left behind."""
        assert not self.s.reqs and len(self.s.parallel) == 0
        self.s.kv.check_invariants([])
        assert self.s.kv.tree is None or self.s.kv.tree.protected_size == 0


class _Counting:
    """The runner, with ``forward`` counted."""

    def __init__(self, runner: ModelRunner, forward: Callable[[ForwardBatch], torch.Tensor]) -> None:
        self._runner = runner
        self.forward = forward

    def __getattr__(self, name: str) -> object:
        return getattr(self._runner, name)


def sampled(n: int, seed: int | None = 11, max_new_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, n=n, ignore_eos=True)


def test_n_4_prefills_once_and_is_reproducible_with_a_seed(runner: ModelRunner) -> None:
    first = Run(runner)
    ids = first.group(0, PROMPT, sampled(4))
    first.run().done()
    assert first.prefilled == len(PROMPT), "the prompt is computed once for the four completions"
    assert [first.final[i].cached_len for i in ids] == [0, *[len(PROMPT)] * 3]
    outputs = [first.tokens[i] for i in ids]
    assert all(len(t) == 12 for t in outputs)
    assert len({tuple(t) for t in outputs}) == 4, "seed + j: four different completions"
    again = Run(runner)
    again.group(100, PROMPT, sampled(4), group=99)
    again.run().done()
    assert [again.tokens[100 + j] for j in range(4)] == outputs, "the same seed gives the same four"


def test_each_completion_equals_its_seed_alone(runner: ModelRunner) -> None:
    together = Run(runner)
    ids = together.group(0, PROMPT, sampled(3, seed=5))
    together.run().done()
    for j, rid in enumerate(ids):
        alone = Run(runner)
        alone.add(0, PROMPT, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5 + j, ignore_eos=True))
        alone.run().done()
        assert together.tokens[rid] == alone.tokens[0]


def test_greedy_completions_equal_one_greedy_run(runner: ModelRunner) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=3)
    group = Run(runner)
    ids = group.group(0, PROMPT, params)
    group.run().done()
    one = Run(runner)
    one.add(0, PROMPT, SamplingParams(max_new_tokens=10, temperature=0.0))
    one.run().done()
    assert all(group.tokens[i] == one.tokens[0] for i in ids)


def test_a_chunked_leader_holds_its_members_back_until_its_prompt_is_in(runner: ModelRunner) -> None:
    r = Run(runner, max_prefill_tokens=16)
    ids = r.group(0, PROMPT, sampled(3))
    r.add(10, OTHER, sampled(1))  # behind the group: passes the waiting members
    r.run().done()
    assert r.prefilled == len(PROMPT) + len(OTHER)
    assert all(len(r.tokens[i]) == 12 for i in [*ids, 10])


def test_without_the_radix_cache_every_member_prefills(runner: ModelRunner) -> None:
    r = Run(runner, enable_radix_cache=False)
    ids = r.group(0, PROMPT, sampled(3))
    r.run().done()
    assert r.prefilled == 3 * len(PROMPT)
    shared = Run(runner)
    shared.group(0, PROMPT, sampled(3))
    shared.run().done()
    assert [r.tokens[i] for i in ids] == [shared.tokens[i] for i in ids], "same results either way"


def test_a_group_id_never_shares_kv_between_different_prompts(runner: ModelRunner) -> None:
    r = Run(runner)
    r.add(0, PROMPT, sampled(1), group=5)
    r.add(1, OTHER, sampled(1), group=5)  # another client's prompt under the same id
    r.run().done()
    assert r.final[1].cached_len == 0
    alone = Run(runner)
    alone.add(0, OTHER, sampled(1))
    alone.run().done()
    assert r.tokens[1] == alone.tokens[0]


def test_a_full_running_batch_forks_what_fits_and_admits_the_rest_from_the_cache(runner: ModelRunner) -> None:
    r = Run(runner, max_running_requests=2)
    ids = r.group(0, PROMPT, sampled(4))
    r.run().done()
    cached = [r.final[i].cached_len for i in ids]
    assert cached[0] == 0 and cached[1] == len(PROMPT), "one member fits beside its leader"
    assert cached[2:] == [len(PROMPT) - 1] * 2, "the others read all but the last token back"
    assert r.prefilled == len(PROMPT) + 2
    together = Run(runner)
    together.group(0, PROMPT, sampled(4))
    together.run().done()
    assert [r.tokens[i] for i in ids] == [together.tokens[i] for i in ids]


def test_aborting_the_leader_mid_prefill_lets_a_member_lead(runner: ModelRunner) -> None:
    r = Run(runner, max_prefill_tokens=16)
    ids = r.group(0, PROMPT, sampled(3))
    r.feed(r.s.step())  # the leader's first chunk
    assert r.s.chunked_req is not None and r.s.chunked_req.request_id == ids[0]
    r.feed(r.s.abort_request(ids[0]))
    assert r.final[ids[0]].finish_reason == "abort"
    r.run().done()
    assert all(len(r.tokens[i]) == 12 for i in ids[1:])
    assert r.final[ids[2]].cached_len == len(PROMPT), "the next leader's prompt is shared"


def test_aborting_a_waiting_member_leaves_the_rest_of_the_group(runner: ModelRunner) -> None:
    r = Run(runner)
    ids = r.group(0, PROMPT, sampled(3))
    r.feed(r.s.abort_request(ids[1]))
    r.run().done()
    assert r.final[ids[1]].finish_reason == "abort" and not r.tokens.get(ids[1])
    assert len(r.tokens[ids[0]]) == len(r.tokens[ids[2]]) == 12
    assert r.prefilled == len(PROMPT)


def test_members_share_the_prompt_logprobs(runner: ModelRunner) -> None:
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, n=2, prompt_logprobs=2)
    r = Run(runner)
    ids = r.group(0, PROMPT, params)
    r.run().done()
    first, second = (r.final[i].prompt_logprobs for i in ids)
    assert first is not None and len(first) == len(PROMPT) - 1
    assert second == first


def test_a_continuation_never_forks(runner: ModelRunner) -> None:
    r = Run(runner)
    r.group(0, PROMPT, sampled(1), group=8)
    r.add(1, PROMPT, sampled(1, seed=12), group=8, resume_ids=(7, 8))
    r.run().done()
    assert len(r.tokens[0]) == 12 and len(r.tokens[1]) == 10
    assert r.final[1].cached_len == len(PROMPT), "it still reads the prompt from the cache"


def test_a_seed_near_the_top_is_refused_when_n_overflows_it() -> None:
    from dpinfer.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="seed \\+ n"):
        SamplingParams(seed=(1 << 64) - 2, n=4)
    assert [p.seed for p in SamplingParams(seed=(1 << 64) - 4, n=4).completions()][-1] == (1 << 64) - 1


def test_members_that_arrive_after_the_leaders_prefill_fork_from_it(runner: ModelRunner) -> None:
    params = sampled(3).completions()
    late = Run(runner)
    late.add(0, PROMPT, params[0], group=4)
    late.feed(late.s.step())  # the leader's prompt is in; it runs on
    late.add(1, PROMPT, params[1], group=4)  # the tokenizer sent these later
    late.add(2, PROMPT, params[2], group=4)
    late.run().done()
    assert late.prefilled == len(PROMPT)
    assert [late.final[i].cached_len for i in range(3)] == [0, len(PROMPT), len(PROMPT)]
    together = Run(runner)
    together.group(0, PROMPT, sampled(3))
    together.run().done()
    assert [late.tokens[i] for i in range(3)] == [together.tokens[i] for i in range(3)]


def test_a_member_after_its_leader_finished_or_lost_its_kv_goes_on_alone(runner: ModelRunner) -> None:
    params = sampled(3, max_new_tokens=2).completions()
    r = Run(runner)
    r.add(0, PROMPT, params[0], group=6)
    r.run()  # the leader is done
    r.add(1, PROMPT, params[1], group=6)
    r.run().done()
    assert r.final[1].cached_len == len(PROMPT) - 1, "read back from the cache, last token computed"
    s = Run(runner)
    s.add(0, PROMPT, sampled(1, max_new_tokens=30), group=7)
    s.feed(s.s.step())
    s.s.pause()
    s.s.suspend()  # the leader is retracted: its KV is gone
    s.s.resume()
    s.s.unpause()
    s.add(1, PROMPT, sampled(1, seed=12), group=7)
    s.run().done()
    assert len(s.tokens[0]) == 30 and len(s.tokens[1]) == 12


def test_a_body_is_one_completion_and_its_group_is_bounded() -> None:
    from dpinfer.errors import InvalidRequestError
    from dpinfer.protocol.bodies import RequestBody

    with pytest.raises(InvalidRequestError, match=r"sampling\.n: a request body is one completion"):
        RequestBody.from_builtins({"prompt": "x", "sampling": {"n": 2}})
    with pytest.raises(InvalidRequestError, match="group must be in"):
        RequestBody.from_builtins({"prompt": "x", "group": 1 << 63})
    assert RequestBody.from_builtins({"prompt": "x", "group": 3}).group == 3
