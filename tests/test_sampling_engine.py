"""The Scheduler's sampling surface on tiny-llama (fp32, CPU) against ``transformers``.

Logprobs and prompt logprobs equal the log-softmax of ``transformers``' logits within 1e-4
(with a chunked prefill, a batch of several requests, and the prefix cache on); greedy with
``repetition_penalty`` equals ``generate(repetition_penalty=...)``; presence and frequency
penalties equal a step-by-step reference computation on ``transformers``' logits;
``min_tokens`` equals ``generate(min_new_tokens=...)``; ``stop_reason`` names what ended a
request.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.errors import InvalidRequestError
from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

MAX_STEPS = 2000
TOLERANCE = 1e-4
PROMPTS = [[(11 * i + 17 * j) % 250 + 3 for j in range(12 + 23 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=4096, max_running_requests=16))


@pytest.fixture(scope="module")
def hf(runner: ModelRunner) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(runner.spec.path, dtype=torch.float32).eval()


class Run:
    """Every request's outputs, stepped until all finished."""

    def __init__(self, runner: ModelRunner, **config: object) -> None:
        settings: dict[str, object] = {"max_kv_tokens": 4096, "max_running_requests": 16, **config}
        self.s = Scheduler(runner, SchedulerConfig(**settings))  # type: ignore[arg-type]
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[PositionLogprobs]] = {}
        self.final: dict[int, SchedulerOutput] = {}

    def add(self, rid: int, prompt: list[int], params: SamplingParams, stream: bool = True) -> None:
        self._feed(self.s.add_request(TokenizedRequest(rid, prompt, params, stream=stream)))

    def run(self) -> Run:
        for _ in range(MAX_STEPS):
            if not self.s.has_work:
                return self
            self._feed(self.s.step())
        raise AssertionError("the scheduler did not finish")

    def _feed(self, outputs: list[SchedulerOutput]) -> None:
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.new_token_ids)
                self.logprobs.setdefault(out.request_id, []).extend(out.logprobs)
            if out.finished:
                self.final[out.request_id] = out


def greedy(n: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kwargs)  # type: ignore[arg-type]


def hf_logprobs(hf: AutoModelForCausalLM, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: row ``p`` is the log-softmax of the logits after ``ids[: p + 1]``."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_position(entry: PositionLogprobs, reference: torch.Tensor, token: int, k: int) -> None:
    got = entry.as_dict()
    top = reference.topk(k).indices.tolist() if k else []
    assert set(entry.ids[:k]) == set(top), "the K most likely tokens"
    assert token in got and len(got) == k + (token not in top)
    for token_id, value in got.items():
        assert abs(value - float(reference[token_id])) < TOLERANCE, (
            token_id,
            value,
            float(reference[token_id]),
        )
    assert list(entry.values[:k]) == sorted(entry.values[:k], reverse=True), "most likely first"


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_equal_transformers(runner: ModelRunner, hf: AutoModelForCausalLM) -> None:
    """A batch mixing requests with logprobs (K = 0, 3, 20), one without, and a sampled one:
    values are the raw log-softmax whatever the sampling transforms."""
    run = Run(runner, max_prefill_tokens=32)  # the long prompts are prefilled in chunks
    asks = {0: greedy(10, logprobs=3), 1: greedy(8, logprobs=0), 2: greedy(8),
            3: SamplingParams(max_new_tokens=8, temperature=1.7, top_k=5, seed=3, logprobs=20)}  # fmt: skip
    for rid, params in asks.items():
        run.add(rid, PROMPTS[rid], params)
    run.run()
    assert 2 not in run.logprobs and run.final[2].logprobs is None, "no logprobs unless asked"
    for rid, params in asks.items():
        if params.logprobs is None:
            continue
        tokens = run.tokens[rid]
        assert len(run.logprobs[rid]) == len(tokens) > 0
        reference = hf_logprobs(hf, PROMPTS[rid] + tokens)
        for j, (entry, token) in enumerate(zip(run.logprobs[rid], tokens, strict=True)):
            check_position(entry, reference[len(PROMPTS[rid]) - 1 + j], token, params.logprobs)


def test_prompt_logprobs_equal_transformers_and_skip_the_prefix_cache(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    run = Run(runner, max_prefill_tokens=16)
    prompt = PROMPTS[3]
    run.add(0, prompt, greedy(4))  # caches the prompt
    run.run()
    run.add(1, prompt, greedy(4, prompt_logprobs=2), stream=False)
    run.add(2, PROMPTS[1], greedy(3, prompt_logprobs=0, logprobs=1))
    run.run()
    assert run.final[1].cached_len == 0, "prompt logprobs need every prompt token computed"
    for rid, p, k in ((1, prompt, 2), (2, PROMPTS[1], 0)):
        entries = run.final[rid].prompt_logprobs
        assert entries is not None and len(entries) == len(p) - 1
        reference = hf_logprobs(hf, p)
        for pos, entry in enumerate(entries):
            check_position(entry, reference[pos], p[pos + 1], k)
    assert run.final[0].prompt_logprobs is None


# ---------------------------------------------------------------------------- penalties


def test_greedy_with_repetition_penalty_equals_generate(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    run = Run(runner)
    for rid, prompt in enumerate(PROMPTS[:3]):
        run.add(rid, prompt, greedy(24, repetition_penalty=1.8, ignore_eos=True))
    run.add(9, PROMPTS[0], greedy(24, ignore_eos=True))  # a neighbour without penalty
    run.run()
    for rid, prompt in enumerate(PROMPTS[:3]):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, repetition_penalty=1.8)  # fmt: skip
        assert run.tokens[rid] == out[0, len(prompt) :].tolist(), f"request {rid}"
    assert run.tokens[9] != run.tokens[0], "the penalty changed the output (else the test proves nothing)"


def reference_penalised(hf: AutoModelForCausalLM, prompt: list[int], n: int, presence: float,
                        frequency: float) -> list[int]:  # fmt: skip
    """Greedy decoding with OpenAI's rule applied by hand to ``transformers``' logits.

    (The random model hardly repeats a token unprompted: negative penalties make it.)"""
    tokens: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.int64), minlength=len(logits)).float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize(("presence", "frequency"), [(-2.0, 0.0), (-2.0, 1.0), (0.0, -1.0)])
def test_presence_and_frequency_penalties_match_a_reference(
    runner: ModelRunner, hf: AutoModelForCausalLM, presence: float, frequency: float
) -> None:
    run = Run(runner)
    run.add(
        0, PROMPTS[1], greedy(24, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True)
    )
    run.add(1, PROMPTS[1], greedy(24, ignore_eos=True))
    run.add(2, PROMPTS[2], greedy(12, ignore_eos=True, presence_penalty=0.5))
    run.run()
    assert run.tokens[0] == reference_penalised(hf, PROMPTS[1], 24, presence, frequency)
    assert run.tokens[0] != run.tokens[1], "the penalty changed the output (else the test proves nothing)"


def test_min_tokens_masks_eos_like_generate(runner: ModelRunner, hf: AutoModelForCausalLM) -> None:
    plain = Run(runner)
    plain.add(0, PROMPTS[2], greedy(32, ignore_eos=True))
    full = plain.run().tokens[0]
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    run = Run(runner)
    run.s.eos_token_ids = (full[k],)  # pretend this token is the model's EOS
    run.add(1, PROMPTS[2], greedy(32, min_tokens=k + 4))
    run.add(2, PROMPTS[2], greedy(32))
    run.run()
    assert run.tokens[2] == full[:k] and run.final[2].stop_reason is None, "EOS: no stop_reason"
    with torch.inference_mode():
        out = hf.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=32, min_new_tokens=k + 4,
                          do_sample=False, eos_token_id=full[k], pad_token_id=0)  # fmt: skip
    expected = out[0, len(PROMPTS[2]) :].tolist()
    if expected[-1] == full[k]:
        expected = expected[:-1]  # generate keeps EOS; the Scheduler reports it as matched_stop
    assert len(run.tokens[1]) >= k + 4 and full[k] not in run.tokens[1][: k + 4]
    assert run.tokens[1] == expected


def test_stop_reason_names_the_stop_token_or_string(runner: ModelRunner) -> None:
    plain = Run(runner)
    plain.add(0, PROMPTS[0], greedy(24, ignore_eos=True))
    full = plain.run().tokens[0]
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    run = Run(runner)
    run.add(1, PROMPTS[0], greedy(24, stop_token_ids=(full[k],)))
    run.add(2, PROMPTS[0], greedy(5, ignore_eos=True))
    run.run()
    assert run.final[1].stop_reason == full[k] and run.tokens[1] == full[:k]
    assert run.final[2].finish_reason == "length" and run.final[2].stop_reason is None
    tok = run.s._stop_decoder()
    stop = tok.decode(full[3:5], skip_special_tokens=True)
    if stop:
        strings = Run(runner)
        strings.add(3, PROMPTS[0], greedy(24, stop=(stop,), ignore_eos=True))
        strings.run()
        assert strings.final[3].stop_reason == stop


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("logprobs", 21, "logprobs must be <= 20"), ("prompt_logprobs", -1, "prompt_logprobs must be >= 0"),
     ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
     ("presence_penalty", 2.5, "presence_penalty must be in [-2.0, 2.0]"),
     ("frequency_penalty", "x", "frequency_penalty must be a number"),
     ("min_tokens", 200, "min_tokens must be <= max_new_tokens"),
     ("include_stop_str_in_output", 1, "include_stop_str_in_output must be a boolean")],
)  # fmt: skip
def test_new_fields_are_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[")):
        SamplingParams.from_dict({field: value})


def test_a_continuation_reports_the_logprobs_of_its_own_tokens(runner: ModelRunner) -> None:
    # A moved request's resumed tokens had their logprobs streamed already: the continuation
    # gives one per token it generates, aligned with them, on every output and the final one.
    params = greedy(12, logprobs=2)
    whole = Run(runner)
    whole.add(0, PROMPTS[1], params)
    whole.run()
    for stream in (True, False):
        moved = Run(runner)
        req = TokenizedRequest(1, PROMPTS[1], params, stream=stream, resume_ids=tuple(whole.tokens[0][:5]))
        moved._feed(moved.s.add_request(req))
        moved.run()
        assert moved.tokens[1] == whole.tokens[0][5:]
        final = moved.final[1].logprobs
        got = moved.logprobs[1] if stream else final
        assert got is not None and len(got) == 7
        for a, b in zip(got, whole.logprobs[0][5:], strict=True):
            assert (
                a.ids == b.ids
                and max(abs(x - y) for x, y in zip(a.values, b.values, strict=True)) < TOLERANCE
            )
