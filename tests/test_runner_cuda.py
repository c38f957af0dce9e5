"""The CUDA path (padded decode attention, GPU pools): greedy parity with ``generate``."""

from __future__ import annotations

import pytest
import torch

from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[(11 * i + 5 * j) % 250 + 3 for j in range(5 + 23 * i)] for i in range(6)]


def test_cuda_greedy_parity_with_prefix_reuse_and_chunks() -> None:
    from transformers import AutoModelForCausalLM

    config = SchedulerConfig(max_kv_tokens=4096, max_running_requests=8, max_prefill_tokens=64)
    scheduler = Scheduler.from_config(ModelConfig(device="cuda"), config)
    model = (
        AutoModelForCausalLM.from_pretrained(scheduler.runner.spec.path, dtype=torch.float32).cuda().eval()
    )
    expected = []
    for prompt in PROMPTS:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=20, do_sample=False)
        tokens = out[0, len(prompt) :].tolist()
        expected.append(tokens[:-1] if tokens and tokens[-1] == 1 else tokens)
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    for i, prompt in enumerate(PROMPTS + PROMPTS):  # the second round reuses cached prefixes
        scheduler.add_request(TokenizedRequest(i, prompt, params, stream=True))
    done = 0
    for _ in range(1000):
        for out in scheduler.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            done += out.finished
        if done == 2 * len(PROMPTS):
            break
    assert done == 2 * len(PROMPTS)
    for i in range(2 * len(PROMPTS)):
        assert got[i] == expected[i % len(PROMPTS)], i
