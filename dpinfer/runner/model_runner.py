"""ModelRunner: one ``transformers`` causal LM running flattened batches on a paged KV pool.

It owns the model, the KV pool memory, the slot allocator and the request->slot table; the
Scheduler decides what to run and keeps the per-request state. ``forward`` takes a
``ForwardBatch`` (see ``attention.py``) and returns the logits of the rows it asks for;
``sample`` turns them into next tokens.

Vision-language models (LLaVA-style): only the language model runs on the KV pool; the
vision tower keeps its own attention. ``image_features`` encodes requests' ``mm_inputs``
(see ``vision.py``) and ``forward`` writes a batch's ``image_embeds`` into the input
embeddings at ``image_positions``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpinfer.config import ConfigError, ModelConfig, SchedulerConfig
from dpinfer.log import get_logger
from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.runner import attention
from dpinfer.runner.attention import DecodeLayout, ForwardBatch
from dpinfer.runner.cpu_kernel import DecodeKernel, load_decode_kernel
from dpinfer.runner.kv_pool import KVLayout, KVPool, ReqToTokenPool, SlotAllocator, kv_pool_tokens
from dpinfer.runner.registry import ModelSpec, load_model, resolve_model
from dpinfer.runner.sampler import SamplingInfo, logprobs, sample
from dpinfer.runner.vision import VisionEncoder

logger = get_logger(__name__)


class ModelRunner:
    """Loads the model of ``model_config`` and a KV pool sized by ``scheduler_config``."""

    supports_images = False
    """Whether requests may carry ``mm_inputs`` (set for a vision-language model)."""

    def __init__(self, model_config: ModelConfig, scheduler_config: SchedulerConfig) -> None:
        self.model_config = model_config
        self.spec: ModelSpec = resolve_model(model_config)
        self.device = torch.device(model_config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {model_config.device}: CUDA is not available on this machine")
        self.dtype: torch.dtype = getattr(torch, model_config.dtype)
        attention.register()
        self.model = load_model(self.spec, model_config.device, model_config.dtype)
        self.vision: VisionEncoder | None = None
        if self.spec.multimodal:
            # The vision tower attends within each image: it keeps its stock attention.
            self.model.set_attn_implementation({"text_config": attention.ATTENTION_NAME})
            self.vision = VisionEncoder(self.model, self.spec)
            self.supports_images = True
        else:
            self.model.set_attn_implementation(attention.ATTENTION_NAME)
        text = self.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.layout = KVLayout(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=head_dim,
            dtype=self.dtype,
        )
        self.decode_kernel = (
            load_decode_kernel(model_config.cache_dir)
            if self.device.type == "cpu" and self.dtype in DecodeKernel.POOL_DTYPES
            else None
        )
        """The C decode-attention kernel (fp32 or bf16 on CPU, when it builds here), else ``None``."""
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.num_slots = kv_pool_tokens(scheduler_config, self.layout, self.device)
        self.max_context_len = min(
            self.spec.context_len, self.num_slots, _sliding_window(text, self.spec.context_len)
        )
        """Longest prompt + output a request may reach (model limit or whole pool, if smaller)."""
        self.kv_pool = KVPool(self.layout, self.num_slots, self.device, scheduler_config.kv_prefault)
        self.allocator = SlotAllocator(self.num_slots, self.device)
        self.req_to_token_pool = ReqToTokenPool(
            scheduler_config.max_running_requests + 2, self.max_context_len, self.device
        )
        logger.info(
            "model %s on %s (%s): KV pool %d tokens (%.1f MiB%s), max context %d",
            self.spec.name,
            self.device,
            model_config.dtype,
            self.num_slots,
            self.kv_pool.size_bytes / 2**20,
            ", prefaulted" if scheduler_config.kv_prefault else "",
            self.max_context_len,
        )

    @property
    def decode_layout(self) -> DecodeLayout:
        """GPU: one padded call; CPU: the C kernel, else a small torch call per request."""
        if self.device.type != "cpu":
            return DecodeLayout.PADDED
        return DecodeLayout.KERNEL if self.decode_kernel is not None else DecodeLayout.RAGGED

    # ------------------------------------------------------------------ compute

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model on ``batch``; return fp32 logits ``[N, V]`` of the kept rows."""
        keep = batch.logits_indices if batch.logits_indices is not None else 0
        with torch.inference_mode():
            inputs: dict[str, torch.Tensor] = {"input_ids": batch.input_ids.unsqueeze(0)}
            if batch.image_embeds is not None:
                assert batch.image_positions is not None
                embeds = self.model.get_input_embeddings()(batch.input_ids)
                embeds.index_copy_(0, batch.image_positions, batch.image_embeds.to(embeds.dtype))
                inputs = {"inputs_embeds": embeds.unsqueeze(0)}
            out = self.model(
                **inputs,
                position_ids=batch.positions.unsqueeze(0),
                attention_mask=None,
                use_cache=False,
                logits_to_keep=keep,
                dp_batch=batch,
            )
        return out.logits[0].float()

    def image_features(self, mm_inputs_list: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per request, features ``[num_image_tokens, hidden]`` on the device (one vision call)."""
        assert self.vision is not None, "image_features on a text-only model"
        return self.vision.encode(mm_inputs_list)

    def check_mm_inputs(self, input_ids: list[int], mm_inputs: object) -> str | None:
        """Why ``mm_inputs`` cannot be served with ``input_ids`` (user message), or ``None``."""
        if self.vision is None:
            return f"model {self.spec.name} does not take images"
        return self.vision.check(input_ids, mm_inputs)

    def sample(self, logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
        with torch.inference_mode():
            return sample(logits, info)

    def logprobs(
        self, logits: torch.Tensor, info: SamplingInfo, next_ids: torch.Tensor
    ) -> list[PositionLogprobs | None] | None:
        """Per row, the sampled token's logprob and the top K (raw logits); ``None`` if no row asked."""
        if info.logprob_rows is None:
            return None
        with torch.inference_mode():
            return logprobs(logits, info, next_ids)

    # ------------------------------------------------------------------ memory

    def release_kv(self) -> None:
        """Free the KV pool memory (suspend); every slot must already be free."""
        self.kv_pool.release()
        self.allocator.clear()

    def allocate_kv(self) -> None:
        """Re-create the KV pool memory (resume)."""
        self.kv_pool.allocate()

    # ------------------------------------------------------------------ weights

    def load_weights(self, path: str) -> int:
        """Copy weights from a HF directory or ``.safetensors`` file into the live model.

        Every tensor is checked (known name, same shape) before anything is copied, so a
        bad checkpoint raises ``ConfigError`` and leaves the model untouched. Returns the
        number of tensors loaded.
        """
        from safetensors.torch import load_file

        files = _safetensors_files(Path(path).expanduser())
        params = self.model.state_dict()
        loaded: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in load_file(str(file)).items():
                target = params.get(name)
                if target is None:
                    raise ConfigError(f"update_weights: {file.name} has unknown tensor {name!r}")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ConfigError(
                        f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                loaded[name] = tensor
        if not loaded:
            raise ConfigError(f"update_weights: no tensors in {path}")
        with torch.no_grad():
            for name, tensor in loaded.items():
                params[name].copy_(tensor)
        logger.info("loaded %d tensors from %s", len(loaded), path)
        return len(loaded)


def _sliding_window(text_config: object, context_len: int) -> int:
    """The model's attention window, beyond which full attention (ours) would be wrong."""
    window = getattr(text_config, "sliding_window", None)
    if not window or window >= context_len or getattr(text_config, "use_sliding_window", True) is False:
        return context_len
    logger.warning("sliding-window attention is not implemented: context capped at %d tokens", window)
    return int(window)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"update_weights: {path} is not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"update_weights: {path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"update_weights: no .safetensors files in {path}")
    return files
