"""Mixed steps on tiny-llama: decodes and prompt chunks in one forward pass, one token budget.

Greedy parity with ``generate`` under mixed steps (staggered arrivals, chunked prefill,
retraction, radix cache on and off) is in ``test_parity.py``; here: what a step is made of,
that a long prompt never freezes the running streams, and that a mixed pass computes the
same logits as its decode and extend parts run on their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.runner.attention import DecodeLayout, ForwardBatch, ForwardMode, mixed_forward_batch
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

MAX_STEPS = 500
SHORT = [[(5 * i + 11 * j) % 250 + 3 for j in range(12 + 7 * i)] for i in range(3)]
LONG = [(3 * j + 7) % 250 + 3 for j in range(600)]  # shares no prefix with SHORT


@dataclass(frozen=True)
class Pass:
    mode: ForwardMode
    num_tokens: int
    num_decode: int


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=4096, max_running_requests=8))


def recording(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> list[Pass]:
    """Record the shape of every forward pass ``runner`` runs from now on."""
    passes: list[Pass] = []
    forward = runner.forward

    def spy(batch: ForwardBatch) -> torch.Tensor:
        num_decode = len(batch.input_ids) if batch.mode is ForwardMode.DECODE else batch.num_decode
        passes.append(Pass(batch.mode, len(batch.input_ids), num_decode))
        return forward(batch)

    monkeypatch.setattr(runner, "forward", spy)
    return passes


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def start_short_requests(s: Scheduler, n: int = 200) -> None:
    for i, prompt in enumerate(SHORT):
        assert s.add_request(TokenizedRequest(i, prompt, greedy(n), stream=True)) == []
    while s.running is None or len(s.running) < len(SHORT):
        s.step()


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "alternating"])
def test_a_long_prompt_never_freezes_running_streams(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, mixed: bool
) -> None:
    budget = 64
    s = Scheduler(runner, SchedulerConfig(max_kv_tokens=4096, max_prefill_tokens=budget, mixed_steps=mixed))
    start_short_requests(s)
    passes = recording(runner, monkeypatch)
    s.add_request(TokenizedRequest(9, LONG, greedy(4), stream=True))
    stalled = 0
    while 9 not in {r.request_id for r in (s.running.reqs if s.running else [])}:
        outputs = s.step()
        tokens = {o.request_id: len(o.new_token_ids) for o in outputs}
        if any(tokens.get(i, 0) == 0 for i in range(len(SHORT))):
            stalled += 1
        assert len(passes) < MAX_STEPS
    chunks = [p for p in passes if p.mode is not ForwardMode.DECODE]
    assert len(chunks) >= len(LONG) // budget, "the long prompt was prefilled in chunks"
    if mixed:
        assert stalled == 0, "every running request got a token in every step"
        assert all(p.mode is ForwardMode.MIXED and p.num_decode == len(SHORT) for p in chunks)
        assert all(p.num_tokens <= budget for p in passes), "decode tokens count in the budget"
        assert sum(p.num_tokens - p.num_decode for p in chunks) == len(LONG)
    else:
        assert stalled == len(chunks), "alternating steps freeze the streams during a prefill"
        assert all(p.mode is ForwardMode.EXTEND and p.num_tokens <= budget for p in chunks)


def test_decodes_filling_the_budget_hold_prompts_back_until_a_request_ends(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Scheduler(runner, SchedulerConfig(max_kv_tokens=4096, max_prefill_tokens=len(SHORT)))
    for i, prompt in enumerate(SHORT):
        s.add_request(TokenizedRequest(i, prompt, greedy(6 + 4 * i), stream=True))
    passes = recording(runner, monkeypatch)
    finished: list[int] = []
    while s.has_work:
        for out in s.step():
            if out.finished:
                finished.append(out.request_id)
                if out.request_id == 0:  # one slot of budget frees up: the next prompt may start
                    s.add_request(TokenizedRequest(7, SHORT[0], greedy(3), stream=True))
        s.kv.check_invariants(list(s.reqs.values()))
        assert len(passes) < MAX_STEPS
    assert sorted(finished) == [0, 1, 2, 7]
    assert all(p.num_tokens <= len(SHORT) for p in passes)
    assert any(p.mode is ForwardMode.MIXED for p in passes), "request 7 rode with the others' decodes"


def test_mixed_pass_equals_its_parts(runner: ModelRunner) -> None:
    """The logits of one mixed pass equal those of its decode part and its extend part run
    one after the other (the second pass rewrites the same K/V into the same slots)."""
    s = Scheduler(runner, SchedulerConfig(max_kv_tokens=4096, max_prefill_tokens=96))
    start_short_requests(s)
    for rid, prompt in ((5, LONG[:40]), (6, LONG[100:400])):  # one whole, one chunked
        s.add_request(TokenizedRequest(rid, prompt, greedy(4), stream=True))
    assert s.running is not None
    slots = s._reserve_decode()
    extend = s._schedule_prefill(s.config.max_prefill_tokens - len(s.running))
    assert extend is not None and len(extend.reqs) == 2 and s.chunked_req is not None
    decode_part = s.running.prepare_for_decode(slots)
    extend_part = extend.prepare_for_extend()
    assert len(extend.sampling_reqs) == 1, "the chunked prompt keeps no logits yet"
    mixed = mixed_forward_batch(decode_part, extend_part)
    assert mixed.mode is ForwardMode.MIXED and mixed.num_decode == len(SHORT)
    together = runner.forward(mixed)
    apart = torch.cat([runner.forward(decode_part), runner.forward(extend_part)])
    assert together.shape == (len(SHORT) + 1, runner.vocab_size)
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bf16_runner() -> Iterator[ModelRunner]:
    config = ModelConfig(dtype="bfloat16")
    yield ModelRunner(config, SchedulerConfig(max_kv_tokens=4096, max_running_requests=8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", [DecodeLayout.PADDED, DecodeLayout.KERNEL])
def test_decode_layouts_agree(request: pytest.FixtureRequest, layout: DecodeLayout, dtype: str) -> None:
    """The GPU's padded decode attention (one call, masked) and the CPU's C kernel (the KV
    read in place) equal the ragged torch path (a call per request) on a GQA model, alone
    and inside a mixed pass; in bfloat16 the kernel computes in fp32 from the bf16 pool, so
    the two agree to bf16's precision."""
    runner: ModelRunner = request.getfixturevalue("runner" if dtype == "float32" else "bf16_runner")
    tol = 1e-4 if dtype == "float32" else 5e-2
    if layout is DecodeLayout.KERNEL and runner.decode_kernel is None:
        pytest.skip("no C compiler here: the CPU decode kernel is not built")
    assert runner.layout.num_kv_heads < runner.model.config.num_attention_heads, "a GQA model"
    s = Scheduler(runner, SchedulerConfig(max_kv_tokens=4096, max_prefill_tokens=96))
    start_short_requests(s)
    s.add_request(TokenizedRequest(5, LONG[:40], greedy(4), stream=True))
    assert s.running is not None
    slots = s._reserve_decode()
    extend = s._schedule_prefill(s.config.max_prefill_tokens - len(s.running))
    assert extend is not None
    ragged = s.running.prepare_for_decode(slots, DecodeLayout.RAGGED)
    s.running.seq_lens -= 1  # prepare the same step again, the other way
    other = s.running.prepare_for_decode(slots, layout)
    assert ragged.kv_rows is not None and other.kv_rows is None
    assert (other.kv_indices is not None) == (layout is DecodeLayout.PADDED)
    assert (other.decode_kernel is not None) == (layout is DecodeLayout.KERNEL)
    torch.testing.assert_close(runner.forward(other), runner.forward(ragged), rtol=tol, atol=tol)
    prefill = extend.prepare_for_extend()
    torch.testing.assert_close(
        runner.forward(mixed_forward_batch(other, prefill)),
        runner.forward(mixed_forward_batch(ragged, prefill)),
        rtol=tol,
        atol=tol,
    )
