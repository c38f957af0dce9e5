"""tiny-llava in the model registry: build, spec, processor loading, runner flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpinfer.config import ConfigError, ModelConfig
from dpinfer.runner.builtin_models import weights_fingerprint
from dpinfer.runner.registry import load_processor, load_tokenizer, resolve_model


def test_tiny_llava_spec_and_deterministic_build(tmp_path: Path) -> None:
    spec = resolve_model(ModelConfig(model="tiny-llava", cache_dir=str(tmp_path)))
    assert spec.architecture == "LlavaForConditionalGeneration"
    assert spec.multimodal and spec.image_token_id == 259 and spec.image_seq_length == 64
    assert spec.vocab_size == 384 and spec.eos_token_ids == (1,) and spec.has_chat_template
    config = json.loads((Path(spec.path) / "config.json").read_text())
    text = config["text_config"]
    assert text["num_attention_heads"] == 4 and text["num_key_value_heads"] == 2, "GQA text model"
    assert config["vision_config"]["image_size"] == 64 and config["vision_config"]["patch_size"] == 8
    default_cache = resolve_model(ModelConfig(model="tiny-llava"))
    assert default_cache.path != spec.path
    assert weights_fingerprint(Path(spec.path)) == weights_fingerprint(Path(default_cache.path))


def test_local_llava_directory_loads_like_the_builtin(tmp_path: Path) -> None:
    built = resolve_model(ModelConfig(model="tiny-llava"))
    local = tmp_path / "my-llava"
    shutil.copytree(built.path, local)
    config = ModelConfig(model=str(local))
    spec = resolve_model(config)
    assert spec.multimodal and spec.image_token_id == 259 and not spec.builtin
    # AutoProcessor/AutoTokenizer cannot load this directory in transformers 5.23: the
    # registry falls back to the tokenizer class it names and assembles a LlavaProcessor.
    assert type(load_tokenizer(config)).__name__ == "ByT5Tokenizer"
    processor = load_processor(config)
    assert processor.image_token == "<extra_id_0>"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"


def test_text_only_model_has_no_processor() -> None:
    assert not resolve_model(ModelConfig(model="tiny-llama")).multimodal
    with pytest.raises(ConfigError, match="text-only"):
        load_processor(ModelConfig(model="tiny-llama"))
