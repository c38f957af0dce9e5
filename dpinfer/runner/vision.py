"""Image features for a LLaVA-style model: what ``mm_inputs`` may hold and how it is encoded.

A request for a vision-language model carries ``mm_inputs``, a map with exactly one of

- ``pixel_values``: float tensor ``[num_images, channels, height, width]`` as the model's
  image processor makes it (the TokenizerProcess sends this), or
- ``image_features``: precomputed projected features ``[num_images, image_seq_length,
  hidden]`` (or flattened ``[num_images * image_seq_length, hidden]``),

and its prompt holds ``image_seq_length`` image tokens per image, in order: the ``k``-th
image token of the prompt gets the ``k``-th feature vector. ``VisionEncoder`` checks that
contract (``check``) and computes the features (``encode``); the runner then writes them
into the language model's input embeddings at the image-token positions, which gives the
same logits as passing ``pixel_values`` to the ``transformers`` model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, cast

import torch

from dpinfer.runner.registry import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
MM_INPUT_KEYS = (PIXEL_VALUES, IMAGE_FEATURES)


class ImageFeatureModel(Protocol):
    """What ``VisionEncoder`` calls on a LLaVA-style model (``PreTrainedModel`` does not declare it)."""

    def get_image_features(
        self,
        *,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int],
        vision_feature_select_strategy: str,
    ) -> object: ...


class VisionEncoder:
    """The vision tower + projector of ``model`` (a ``transformers`` LLaVA-style model)."""

    def __init__(self, model: PreTrainedModel, spec: ModelSpec) -> None:
        assert spec.image_token_id is not None, "VisionEncoder needs a multimodal spec"
        self.model = cast(ImageFeatureModel, model)
        self.image_token_id: int = spec.image_token_id
        self.tokens_per_image = spec.image_seq_length
        config = model.config
        vision = config.vision_config
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        self.hidden_size = int(config.get_text_config().hidden_size)
        self.pixel_shape = (
            int(getattr(vision, "num_channels", 3)),
            int(vision.image_size),
            int(vision.image_size),
        )
        self.device = model.device
        self.dtype = model.dtype

    def check(self, input_ids: list[int], mm_inputs: object) -> str | None:
        """Why ``mm_inputs`` cannot go with ``input_ids`` (a message for the user), or ``None``."""
        if not isinstance(mm_inputs, dict):
            return f"mm_inputs must be a map with one of {', '.join(MM_INPUT_KEYS)}"
        unknown = sorted(str(k) for k in mm_inputs if k not in MM_INPUT_KEYS)
        present = [k for k in MM_INPUT_KEYS if k in mm_inputs]
        if unknown or len(present) != 1:
            extra = f" (unknown: {', '.join(unknown)})" if unknown else ""
            return f"mm_inputs must hold exactly one of {', '.join(MM_INPUT_KEYS)}{extra}"
        key = present[0]
        value = mm_inputs[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"mm_inputs[{key!r}] must be a floating-point tensor"
        if key == PIXEL_VALUES:
            if value.dim() != 4 or tuple(value.shape[1:]) != self.pixel_shape or value.shape[0] == 0:
                return (
                    f"pixel_values must have shape [num_images, {', '.join(map(str, self.pixel_shape))}], "
                    f"got {list(value.shape)}"
                )
            num_images = int(value.shape[0])
        else:
            per_image = (self.tokens_per_image, self.hidden_size)
            if value.dim() == 2 and value.shape[1] == self.hidden_size:
                num_images = int(value.shape[0]) // max(1, self.tokens_per_image)
                flat_ok = value.shape[0] > 0 and value.shape[0] % self.tokens_per_image == 0
            else:
                num_images = int(value.shape[0]) if value.dim() == 3 else 0
                flat_ok = value.dim() == 3 and tuple(value.shape[1:]) == per_image and num_images > 0
            if not flat_ok:
                return (
                    f"image_features must have shape [num_images, {per_image[0]}, {per_image[1]}], "
                    f"got {list(value.shape)}"
                )
        num_tokens = sum(1 for t in input_ids if t == self.image_token_id)
        expected = num_images * self.tokens_per_image
        if num_tokens != expected:
            return (
                f"the prompt has {num_tokens} image tokens (id {self.image_token_id}) but "
                f"{num_images} image(s) need {expected} ({self.tokens_per_image} each)"
            )
        return None

    def encode(self, mm_inputs_list: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Features ``[num_image_tokens, hidden]`` for each request's (checked) ``mm_inputs``.

        Pixel values of all requests go through the vision tower in one call.
        """
        out: list[torch.Tensor | None] = [None] * len(mm_inputs_list)
        pixels: list[torch.Tensor] = []
        owners: list[int] = []
        for i, mm in enumerate(mm_inputs_list):
            if IMAGE_FEATURES in mm:
                feats = mm[IMAGE_FEATURES].to(self.device, self.dtype)
                out[i] = feats.reshape(-1, self.hidden_size)
            else:
                pixels.append(mm[PIXEL_VALUES].to(self.device, self.dtype))
                owners.append(i)
        if pixels:
            feats = self._vision_features(torch.cat(pixels))
            start = 0
            for i, pv in zip(owners, pixels, strict=True):
                n = pv.shape[0] * self.tokens_per_image
                out[i] = feats[start : start + n]
                start += n
        return [f for f in out if f is not None]

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            result = self.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.select_strategy,
            )
        # transformers 5 returns a model output whose pooler_output lists per-image features;
        # older releases return the features themselves.
        feats = getattr(result, "pooler_output", result)
        if isinstance(feats, list | tuple):
            feats = torch.cat(list(feats))
        assert isinstance(feats, torch.Tensor), f"get_image_features gave a {type(feats).__name__}"
        feats = feats.reshape(-1, feats.shape[-1])
        assert feats.shape[0] == pixel_values.shape[0] * self.tokens_per_image, (
            f"vision tower gave {feats.shape[0]} features for {pixel_values.shape[0]} images; "
            f"config says {self.tokens_per_image} per image"
        )
        return feats


def image_token_positions(input_ids: list[int], image_token_id: int) -> torch.Tensor:
    """Prompt positions of the image tokens, in order (CPU ``int64``)."""
    return torch.tensor([i for i, t in enumerate(input_ids) if t == image_token_id], dtype=torch.int64)


def mm_inputs_hash(mm_inputs: Mapping[str, object]) -> bytes:
    """A content hash of ``mm_inputs`` tensors, for requests that arrive without ``mm_hash``."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(mm_inputs):
        value = mm_inputs[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            cpu = value.detach().to("cpu").contiguous()
            digest.update(str((cpu.dtype, tuple(cpu.shape))).encode())
            digest.update(cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b"")
    return digest.digest()
