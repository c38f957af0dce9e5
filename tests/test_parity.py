"""Greedy parity with ``transformers`` ``generate`` (fp32, CPU) under continuous batching.

32 prompts of mixed lengths (half share prefixes) arrive a few at a time, so extend and
decode steps interleave. The same expected outputs must come out with the radix cache on
and off, with chunked prefill, and with a KV pool so small that requests are retracted.
Each combination runs with mixed steps (decodes and prompt chunks in one forward pass, the
default) and without them (prefill-only and decode-only passes), and checks that the passes
it ran were of the kind it asked for. ``generate`` keeps the EOS token in its output; the
Scheduler does not (it reports it as ``matched_stop``), so the comparison strips a trailing
EOS from ``generate``'s output.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.runner.attention import ForwardMode
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

NUM_PROMPTS = 32
MAX_STEPS = 5000


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    max_new_tokens: int
    expected: list[int]
    hit_eos: bool


def make_prompts(seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 259) for _ in range(80)]
    prompts, lens = [], []
    for i in range(NUM_PROMPTS):
        own = [rng.randrange(3, 259) for _ in range(rng.randrange(1, 140))]
        prompts.append((shared[: rng.randrange(10, 80)] if i % 2 else []) + own)
        lens.append(rng.randrange(1, 48))
    return prompts, lens


def hf_expected(model: AutoModelForCausalLM, prompt: list[int], max_new: int, eos: tuple[int, ...]) -> Case:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)
    tokens = out[0, len(prompt) :].tolist()
    hit = bool(tokens) and tokens[-1] in eos
    return Case(prompt, max_new, tokens[:-1] if hit else tokens, hit)


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=8192, max_running_requests=16))


@pytest.fixture(scope="module")
def cases(runner: ModelRunner) -> list[Case]:
    model = AutoModelForCausalLM.from_pretrained(runner.spec.path, dtype=torch.float32).eval()
    prompts, lens = make_prompts(seed=1)  # a seed whose prompts hit EOS (3 of 32)
    return [hf_expected(model, p, n, runner.spec.eos_token_ids) for p, n in zip(prompts, lens, strict=True)]


def serve(
    scheduler: Scheduler, cases: list[Case], per_arrival: int = 4, every: int = 3
) -> dict[int, list[int]]:
    """Submit ``per_arrival`` requests every ``every`` steps; return each request's tokens."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(cases))}
    final: dict[int, SchedulerOutput] = {}
    submitted = 0
    for step in range(MAX_STEPS):
        if submitted < len(cases) and step % every == 0:
            for case in cases[submitted : submitted + per_arrival]:
                params = SamplingParams(max_new_tokens=case.max_new_tokens, temperature=0.0)
                assert (
                    scheduler.add_request(TokenizedRequest(submitted, case.prompt, params, stream=True)) == []
                )
                submitted += 1
        for out in scheduler.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
        scheduler.kv.check_invariants(list(scheduler.reqs.values()))
        if len(final) == len(cases):
            break
    assert len(final) == len(cases), "every request finished"
    for i, case in enumerate(cases):
        assert final[i].finish_reason == ("stop" if case.hit_eos else "length"), i
    return tokens


def assert_parity(tokens: dict[int, list[int]], cases: list[Case]) -> None:
    wrong = [i for i, case in enumerate(cases) if tokens[i] != case.expected]
    assert not wrong, (
        f"requests {wrong} differ from generate, e.g. {tokens[wrong[0]]} vs {cases[wrong[0]].expected}"
    )


def assert_step_kinds(scheduler: Scheduler) -> None:
    """Mixed steps ran when asked for (and only then), beside plain decode and extend passes."""
    steps = scheduler.steps_by_mode
    assert steps[ForwardMode.DECODE] > 0 and steps[ForwardMode.EXTEND] > 0
    if scheduler.config.mixed_steps:
        assert steps[ForwardMode.MIXED] > 0, "some prompt chunks rode with running decodes"
    else:
        assert steps[ForwardMode.MIXED] == 0


MIXED = pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "alternating"])


def test_workload_exercises_eos_and_mixed_lengths(cases: list[Case]) -> None:
    assert any(c.hit_eos for c in cases), "at least one prompt ends with EOS"
    assert min(len(c.prompt) for c in cases) < 20 and max(len(c.prompt) for c in cases) > 120


@MIXED
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "no_radix"])
def test_greedy_parity(runner: ModelRunner, cases: list[Case], radix: bool, mixed: bool) -> None:
    config = SchedulerConfig(max_kv_tokens=8192, enable_radix_cache=radix, mixed_steps=mixed)
    scheduler = Scheduler(runner, config)
    tokens = serve(scheduler, cases)
    assert_parity(tokens, cases)
    assert scheduler.num_retractions == 0
    assert_step_kinds(scheduler)


@MIXED
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "no_radix"])
def test_greedy_parity_with_chunked_prefill(
    runner: ModelRunner, cases: list[Case], radix: bool, mixed: bool
) -> None:
    chunk = 48
    assert max(len(c.prompt) for c in cases) > 2 * chunk, "some prompts need several chunks"
    config = SchedulerConfig(
        max_kv_tokens=8192, max_prefill_tokens=chunk, enable_radix_cache=radix, mixed_steps=mixed
    )
    scheduler = Scheduler(runner, config)
    assert_parity(serve(scheduler, cases), cases)
    assert_step_kinds(scheduler)


@MIXED
@pytest.mark.parametrize("radix", [True, False], ids=["radix", "no_radix"])
def test_greedy_parity_with_retraction(cases: list[Case], radix: bool, mixed: bool) -> None:
    longest = max(len(c.prompt) + c.max_new_tokens for c in cases)
    pool = longest + 24
    small = ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=pool, max_running_requests=16))
    config = SchedulerConfig(max_kv_tokens=pool, enable_radix_cache=radix, mixed_steps=mixed)
    scheduler = Scheduler(small, config)
    assert scheduler.max_context_len == pool
    scheduler.new_token_ratio = 0.0  # admit optimistically so decode runs out of slots
    tokens = serve(scheduler, cases, per_arrival=8, every=1)
    assert scheduler.num_retractions > 0, "the pool was small enough to force retractions"
    assert_parity(tokens, cases)
    assert_step_kinds(scheduler)


@pytest.mark.slow
def test_smollm2_greedy_parity() -> None:
    pytest.importorskip("gguf")
    config = ModelConfig(model="smollm2-135m")
    runner = ModelRunner(config, SchedulerConfig(max_kv_tokens=2048, max_running_requests=4))
    from dpinfer.runner.registry import load_tokenizer

    tokenizer = load_tokenizer(config)
    texts = ["What is the capital of France?", "The quick brown fox", "def fibonacci(n):"]
    model = AutoModelForCausalLM.from_pretrained(runner.spec.path, dtype=torch.float32).eval()
    eos = runner.spec.eos_token_ids
    cases = [hf_expected(model, tokenizer.encode(t), 16, eos) for t in texts]
    scheduler = Scheduler(runner, SchedulerConfig(max_kv_tokens=2048))
    assert_parity(serve(scheduler, cases, per_arrival=1, every=2), cases)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_local_directory_models_of_other_families(
    tmp_path_factory: pytest.TempPathFactory, family: str
) -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    config = config_cls(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=1,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    prompts, lens = make_prompts(seed=2)
    cases = [hf_expected(model, p[:100], n, (1,)) for p, n in zip(prompts[:8], lens[:8], strict=True)]
    runner = ModelRunner(
        ModelConfig(model=str(path)), SchedulerConfig(max_kv_tokens=2048, max_running_requests=8)
    )
    assert runner.spec.architecture == model_cls.__name__
    scheduler = Scheduler(runner, SchedulerConfig(max_kv_tokens=2048, max_prefill_tokens=64))
    assert_parity(serve(scheduler, cases, per_arrival=2, every=2), cases)
