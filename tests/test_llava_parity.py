"""tiny-llava through the Scheduler: greedy output equals ``transformers`` ``generate``.

The reference is ``LlavaForConditionalGeneration.generate`` on the processor's own inputs
(``<extra_id_0>`` placeholders, pixel values); the Scheduler gets the same ids and pixel
values as ``mm_inputs`` and injects vision features into the input embeddings. Covered:
several prompts and images in one batch, chunked prefill that cuts through an image,
retraction (suspend/resume) mid-prefill and mid-decode, precomputed features, and the
prefix cache keyed by the image hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.runner.registry import load_processor
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

MODEL = ModelConfig(model="tiny-llava")
MAX_STEPS = 400
MAX_NEW = 16


@dataclass(frozen=True)
class Case:
    input_ids: list[int]
    pixel_values: torch.Tensor
    expected: list[int]


def make_image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = [make_image(1, 48, 80), make_image(2, 64, 64), make_image(3, 100, 30)]
PROMPTS = [
    ("<extra_id_0>describe the picture", [0]),
    ("compare <extra_id_0> with <extra_id_0>, please", [1, 2]),
    ("short <extra_id_0>", [2]),
    ("<extra_id_0>describe the picture", [1]),  # same text as case 0, another image
]


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(MODEL, SchedulerConfig(max_kv_tokens=2048, max_running_requests=8))


@pytest.fixture(scope="module")
def cases(runner: ModelRunner) -> list[Case]:
    processor = load_processor(MODEL)
    model = AutoModelForImageTextToText.from_pretrained(runner.spec.path, dtype=torch.float32).eval()
    out = []
    for text, image_ids in PROMPTS:
        images = [IMAGES[i] for i in image_ids]
        enc = processor(images=images, text=text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            generated = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        tokens = generated[0, enc["input_ids"].shape[1] :].tolist()
        if tokens and tokens[-1] in runner.spec.eos_token_ids:
            tokens = tokens[:-1]  # the Scheduler reports EOS as matched_stop, not as output
        out.append(Case(enc["input_ids"][0].tolist(), enc["pixel_values"], tokens))
    return out


def request(
    i: int, case: Case, mm: str = "pixel_values", runner: ModelRunner | None = None
) -> TokenizedRequest:
    if mm == "pixel_values":
        mm_inputs = {"pixel_values": case.pixel_values}
    else:
        assert runner is not None
        (features,) = runner.image_features([{"pixel_values": case.pixel_values}])
        mm_inputs = {"image_features": features.clone()}
    return TokenizedRequest(
        request_id=i,
        input_ids=case.input_ids,
        sampling=SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0),
        mm_inputs=mm_inputs,
        mm_hash=bytes(str(case.pixel_values.sum().item()), "ascii"),
    )


def drain(scheduler: Scheduler, on_step: dict[int, object] | None = None) -> dict[int, SchedulerOutput]:
    """Step until idle; ``on_step[n]`` (a callable) runs before step ``n``. Final outputs by id."""
    final: dict[int, SchedulerOutput] = {}
    tokens: dict[int, list[int]] = {}
    for step in range(MAX_STEPS):
        hook = (on_step or {}).get(step)
        if callable(hook):
            hook()
        for out in scheduler.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
        if not scheduler.has_work:
            break
    else:
        pytest.fail(f"scheduler still busy after {MAX_STEPS} steps")
    for rid, out in final.items():
        assert out.error is None, f"request {rid} failed: {out.error}"
        final[rid] = SchedulerOutput(rid, tokens[rid], True, out.finish_reason, cached_len=out.cached_len)
    return final


def check(final: dict[int, SchedulerOutput], cases: list[Case], ids: list[int]) -> None:
    for i in ids:
        assert final[i].new_token_ids == cases[i].expected, f"case {i} differs from transformers generate"


def test_processor_prompts_have_64_tokens_per_image(cases: list[Case]) -> None:
    for case, (_, image_ids) in zip(cases, PROMPTS, strict=True):
        assert case.input_ids.count(259) == 64 * len(image_ids)
        assert tuple(case.pixel_values.shape) == (len(image_ids), 3, 64, 64)
    assert cases[0].expected != cases[3].expected, "different images should change the output"


def test_batch_of_images_matches_generate(runner: ModelRunner, cases: list[Case]) -> None:
    scheduler = Scheduler(runner, SchedulerConfig(max_running_requests=8, enable_radix_cache=False))
    for i, case in enumerate(cases):
        assert scheduler.add_request(request(i, case)) == []
    check(drain(scheduler), cases, list(range(len(cases))))


def test_chunked_prefill_cuts_through_images(runner: ModelRunner, cases: list[Case]) -> None:
    # 40-token chunks: every image's 64 tokens straddle at least one chunk boundary.
    scheduler = Scheduler(runner, SchedulerConfig(max_prefill_tokens=40, max_running_requests=8))
    for i, case in enumerate(cases):
        scheduler.add_request(request(i, case))
    check(drain(scheduler), cases, list(range(len(cases))))


def test_retraction_recomputes_image_features(runner: ModelRunner, cases: list[Case]) -> None:
    scheduler = Scheduler(runner, SchedulerConfig(max_prefill_tokens=50, max_running_requests=8))
    for i, case in enumerate(cases[:3]):
        scheduler.add_request(request(i, case))

    def retract_everything() -> None:
        scheduler.pause()  # the lifecycle's way there: pause, suspend, resume, unpause
        scheduler.suspend()  # drops all KV and the prefix cache: prefill starts over
        scheduler.resume()
        scheduler.unpause()

    # Step 1 is mid-prefill (a chunked request holds half an image); step 6 is mid-decode.
    final = drain(scheduler, {1: retract_everything, 6: retract_everything})
    assert scheduler.num_retractions >= 3
    check(final, cases, [0, 1, 2])


def test_precomputed_features_match_pixel_values(runner: ModelRunner, cases: list[Case]) -> None:
    scheduler = Scheduler(runner, SchedulerConfig(max_running_requests=8))
    scheduler.add_request(request(1, cases[1], mm="image_features", runner=runner))
    check(drain(scheduler), cases, [1])


def test_different_images_never_share_kv_same_image_does(runner: ModelRunner, cases: list[Case]) -> None:
    scheduler = Scheduler(runner, SchedulerConfig(max_running_requests=8))
    prompt_len = len(cases[0].input_ids)
    assert cases[0].input_ids == cases[3].input_ids, "same text and token shape, different image"
    # Both at once: in-batch prefix sharing must not apply across different images.
    scheduler.add_request(request(0, cases[0]))
    scheduler.add_request(request(3, cases[3]))
    first = drain(scheduler)
    check(first, cases, [0, 3])
    assert first[0].cached_len == 0 and first[3].cached_len == 0
    # The same image again hits the cache (all but the last prompt token) and still matches.
    scheduler.add_request(request(10, cases[0]))
    again = drain(scheduler)
    assert again[10].new_token_ids == cases[0].expected
    assert again[10].cached_len == prompt_len - 1, "the same image should reuse the cached prompt"
    scheduler.kv.check_invariants([])


def test_bad_mm_inputs_get_error_outputs(runner: ModelRunner, cases: list[Case]) -> None:
    scheduler = Scheduler(runner, SchedulerConfig(max_running_requests=8))
    case = cases[1]  # two images
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    bad = {
        "one image for two": {"pixel_values": case.pixel_values[:1]},
        "wrong size": {"pixel_values": torch.zeros(2, 3, 32, 32)},
        "unknown key": {"pixel_values": case.pixel_values, "extra": torch.zeros(1)},
        "not a tensor": {"pixel_values": [1, 2, 3]},
    }
    for i, mm_inputs in enumerate(bad.values()):
        outs = scheduler.add_request(TokenizedRequest(i, case.input_ids, sampling, mm_inputs=mm_inputs))
        assert len(outs) == 1 and outs[0].finish_reason == "error", list(bad)[i]
        assert outs[0].error
    assert not scheduler.has_work


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_images_with_chunked_prefill_match_generate(cases: list[Case]) -> None:
    config = SchedulerConfig(max_kv_tokens=4096, max_running_requests=8, max_prefill_tokens=40)
    scheduler = Scheduler.from_config(ModelConfig(model="tiny-llava", device="cuda"), config)
    model = AutoModelForImageTextToText.from_pretrained(scheduler.runner.spec.path, dtype=torch.float32)
    model = model.cuda().eval()
    expected = []
    for case in cases:
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([case.input_ids], device="cuda"),
                pixel_values=case.pixel_values.cuda(),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )
        tokens = out[0, len(case.input_ids) :].tolist()
        expected.append(tokens[:-1] if tokens and tokens[-1] == 1 else tokens)
    for i, case in enumerate(cases):
        scheduler.add_request(request(i, case))
    final = drain(scheduler)
    for i in range(len(cases)):
        assert final[i].new_token_ids == expected[i], f"case {i} differs from transformers on CUDA"
