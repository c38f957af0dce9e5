"""``Scheduler.update_weights``: only while paused, all-or-nothing, prefix cache dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from dpinfer.config import ConfigError, ModelConfig, SchedulerConfig
from dpinfer.errors import ServiceError
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.runner.builtin_models import tiny_llama_config
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.scheduler import Scheduler

PROMPT = [(5 * j) % 200 + 3 for j in range(30)]
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0)


def run_one(s: Scheduler, rid: int) -> list[int]:
    s.add_request(TokenizedRequest(rid, PROMPT, PARAMS))
    for _ in range(100):
        for out in s.step():
            if out.finished and out.request_id == rid:
                return out.new_token_ids
    raise AssertionError("request did not finish")


def hf_greedy(model: LlamaForCausalLM) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    return out[0, len(PROMPT) :].tolist()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    path = tmp_path_factory.mktemp("weights")
    model.save_pretrained(path)
    return path, hf_greedy(model)


def test_update_weights_needs_pause_then_serves_new_weights(other_weights: tuple[Path, list[int]]) -> None:
    path, expected_new = other_weights
    s = Scheduler.from_config(ModelConfig(), SchedulerConfig(max_kv_tokens=2048, max_running_requests=4))
    before = run_one(s, 1)
    assert before != expected_new, "the two weight sets differ"
    with pytest.raises(ServiceError, match="paused"):
        s.update_weights(str(path))
    # A request mid-flight is retracted and finishes after the update.
    s.add_request(TokenizedRequest(2, PROMPT, PARAMS))
    s.step()
    s.pause()
    s.update_weights(str(path))
    assert s.kv.tree is not None and s.kv.tree.total_size == 0, "prefix cache dropped"
    assert s.running is None and [r.request_id for r in s.waiting] == [2]
    s.unpause()
    assert run_one(s, 3) == expected_new


def test_bad_checkpoint_is_rejected_and_model_untouched(tmp_path: Path) -> None:
    s = Scheduler.from_config(ModelConfig(), SchedulerConfig(max_kv_tokens=2048, max_running_requests=4))
    before = run_one(s, 1)
    s.pause()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.norm.weight": torch.zeros(7)}, str(wrong))
    with pytest.raises(ConfigError, match="shape"):
        s.update_weights(str(wrong))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"not.a.param": torch.zeros(2)}, str(unknown))
    with pytest.raises(ConfigError, match="unknown tensor"):
        s.update_weights(str(unknown))
    with pytest.raises(ConfigError, match="does not exist"):
        s.update_weights(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \.safetensors"):
        s.update_weights(str(tmp_path / "empty"))
    s.unpause()
    assert run_one(s, 2) == before
