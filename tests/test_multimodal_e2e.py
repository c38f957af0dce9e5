"""tiny-llava through the coordinator, one rank per request transport.

Rank 0 runs the ``zmq`` transport (pickled requests), rank 1 the ``shm`` fast path (pixel
values in the shared-memory region). Requests are pinned to a rank so each mode is tested:
greedy output for image + prompt equals ``transformers`` ``generate`` on the processor's own
inputs; two images with one prompt give what each gives alone; abort works in shm mode; a
bad image gets an error reply and the rank keeps serving; STOP leaves no shared memory behind.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine_e2e import RankProcess, short_tmpdir, start_rank
from wire import WireClient

from dpinfer import AsyncInferenceClient, InferenceClient, SamplingParams, protocol
from dpinfer.config import CoordinatorConfig, ModelConfig, new_deployment_id
from dpinfer.coordinator.process import CoordinatorHandle, start_coordinator
from dpinfer.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(model="tiny-llava")
MAX_NEW = 12
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
MODES = {0: "zmq", 1: "shm"}
_ids = itertools.count(500_000)


def make_image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [make_image(11, 64, 64), make_image(12, 40, 90)]
PROMPT = "describe the picture"


@dataclass
class Served:
    coordinator: CoordinatorHandle
    ranks: dict[int, RankProcess]
    deployment_id: str
    workdir: Path


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    workdir = short_tmpdir()
    deployment_id = new_deployment_id()
    coordinator = start_coordinator(CoordinatorConfig(port=0))
    ranks: dict[int, RankProcess] = {}
    try:
        for rank, mode in MODES.items():
            ranks[rank] = start_rank(
                coordinator.address, workdir, rank, "tiny-llava",
                "--transport", mode, "--deployment-id", deployment_id,
                "--shm-region-bytes", str(8 << 20),
            )  # fmt: skip
        with InferenceClient(coordinator.address, timeout_s=10) as client:
            deadline = time.monotonic() + 240
            while sum(r["alive"] for r in client.status()["ranks"]) < len(MODES):
                for r in ranks.values():
                    assert r.proc.poll() is None, f"a rank exited:\n{r.log()}"
                assert time.monotonic() < deadline, "tiny-llava ranks did not come up"
                time.sleep(0.2)  # ranks load a model: poll status with a deadline
        yield Served(coordinator, ranks, deployment_id, workdir)
    finally:
        for r in ranks.values():
            r.kill()
        coordinator.stop(timeout_s=5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def expected() -> dict[int, list[int]]:
    """Reference greedy ids from ``LlavaForConditionalGeneration.generate``, one per image."""
    from transformers import AutoModelForImageTextToText

    from dpinfer.runner.registry import load_processor, resolve_model

    spec = resolve_model(MODEL)
    processor = load_processor(MODEL)
    model = AutoModelForImageTextToText.from_pretrained(spec.path, dtype=torch.float32).eval()
    out = {}
    for i, image in enumerate(IMAGES):
        enc = processor(
            images=[image], text="<extra_id_0>" + PROMPT, return_tensors="pt", add_special_tokens=False
        )
        with torch.inference_mode():
            generated = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
        tokens = generated[0, enc["input_ids"].shape[1] :].tolist()
        if tokens and tokens[-1] in spec.eos_token_ids:
            tokens = tokens[:-1]  # the engine reports EOS as the stop, not as output
        out[i] = tokens
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("rank", sorted(MODES), ids=lambda r: MODES[r])
def test_image_prompt_matches_generate(served: Served, expected: dict[int, list[int]], rank: int) -> None:
    with InferenceClient(served.coordinator.address, timeout_s=60) as client:
        prompts = [
            {"prompt": f"<image>{PROMPT}", "images": [IMAGES[0]]},  # a PIL image
            {"prompt": PROMPT, "images": [_png(IMAGES[1])]},  # encoded bytes, no mark: image first
        ]
        results = client.generate(prompts, GREEDY, rank=rank)
    for i, result in enumerate(results):
        assert result.ok and result.rank == rank, result
        assert list(result.token_ids) == expected[i], f"image {i} on the {MODES[rank]} rank"


@pytest.mark.parametrize("rank", sorted(MODES), ids=lambda r: MODES[r])
def test_two_images_same_prompt_give_what_each_gives_alone(
    served: Served, expected: dict[int, list[int]], rank: int
) -> None:
    with InferenceClient(served.coordinator.address, timeout_s=60) as client:
        both = client.generate(
            [{"prompt": f"<image>{PROMPT}", "images": [np.asarray(img)]} for img in IMAGES], GREEDY, rank=rank
        )
        alone = [
            client.generate({"prompt": f"<image>{PROMPT}", "images": [img]}, GREEDY, rank=rank)[0]
            for img in IMAGES
        ]
    assert (
        [list(r.token_ids) for r in both] == [list(r.token_ids) for r in alone] == [expected[0], expected[1]]
    )
    assert expected[0] != expected[1], "the two images should lead to different outputs"


def test_abort_in_shm_mode(served: Served) -> None:
    async def scenario() -> None:
        async with AsyncInferenceClient(served.coordinator.address, timeout_s=30) as client:
            long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
            stream = client.add_request_streaming(f"<image>{PROMPT}", long, images=[IMAGES[0]], rank=1)
            first = await asyncio.wait_for(stream.__anext__(), timeout=60)  # running: it has streamed
            assert not first.finished
            await client.abort_request(stream.request_id)
            last = first
            async for delta in stream:
                last = delta
            assert last.finished and last.result is not None
            assert last.result.finish_reason == "abort", last.result
            after = await client.add_request(f"<image>{PROMPT}", GREEDY, images=[IMAGES[1]], rank=1)
            assert after.ok, after

    asyncio.run(scenario())


@pytest.mark.parametrize("rank", sorted(MODES), ids=lambda r: MODES[r])
def test_bad_images_get_error_replies_and_the_rank_keeps_serving(served: Served, rank: int) -> None:
    # Raw bodies, as a client other than ours might send them (our SDK rejects some of these early).
    raw = {"shape": [4, 4, 7], "dtype": "uint8", "data": bytes(4 * 4 * 7)}
    short = {"shape": [8, 8, 3], "dtype": "uint8", "data": bytes(10)}
    bad_bodies = [
        {"prompt": PROMPT, "images": [b"this is not an image"]},
        {"prompt": PROMPT, "images": [raw]},  # 7 channels
        {"prompt": PROMPT, "images": [short]},  # data shorter than its shape
        {"prompt": f"<image><image>{PROMPT}", "images": [_png(IMAGES[0])]},  # more marks than images
        {"prompt": PROMPT, "images": "not a list"},
    ]
    client = WireClient(served.coordinator.address)
    try:
        ids = []
        for body in bad_bodies:
            crid = next(_ids)
            client.send(
                protocol.Submit((protocol.SubmitEntry(crid, rank, False),), (protocol.pack_body(body),))
            )
            ids.append(crid)
        for body, res in zip(bad_bodies, client.wait_results(ids, 60), strict=True):
            assert res.final is not None and res.final.finish_reason == "error" and res.final.error, body
    finally:
        client.close()
    with InferenceClient(served.coordinator.address, timeout_s=60) as sdk:
        with pytest.raises(InvalidRequestError, match="channels"):
            sdk.generate({"prompt": PROMPT, "images": [np.zeros((4, 4, 7), dtype=np.uint8)]}, GREEDY)
        (good,) = sdk.generate({"prompt": PROMPT, "images": [IMAGES[0]]}, GREEDY, rank=rank)
        assert good.ok, good


def test_multimodal_example_runs(served: Served) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multimodal.py"), served.coordinator.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout and "error" not in done.stdout, done.stdout


def test_stop_leaves_no_shared_memory(served: Served) -> None:
    with InferenceClient(served.coordinator.address, timeout_s=60) as client:
        ack = client.stop_engines(drain=True, deadline_s=10)
    assert ack.ok and {a.rank for a in ack.acks} == set(MODES)
    for r in served.ranks.values():
        assert r.proc.wait(timeout=60) == 0, r.log()
    left = [n for n in os.listdir("/dev/shm") if served.deployment_id in n]
    assert not left, f"shared memory left behind: {left}"
