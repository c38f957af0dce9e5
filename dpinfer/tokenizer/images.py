"""Images of a request -> model inputs: the TokenizerProcess's multimodal entry point.

``ImageProcessorAdapter(model_config)`` is built once per process. ``prepare(prompt_text,
token_ids, messages, images)`` returns a ``PreparedPrompt``: the prompt's token ids with
each image's place expanded to the model's image tokens (rules in ``multimodal.py``), the
``mm_inputs`` the Scheduler expects (``{"pixel_values": float tensor [num_images, 3, H, W]}``
in the model's dtype, see ``dpinfer.runner.vision``) and ``mm_hash``, a content hash of the
decoded pixels that keys the prefix cache (two different images never share KV; the same
image sent twice, even once as PNG and once as raw pixels, does).

Each image item is a ``protocol.bodies.ImageItem`` of a decoded ``RequestBody``: encoded
file bytes (decoded with Pillow) or a ``RawImage`` whose shape and size ``RequestBody``
already checked. Items are checked against ``ImageLimits`` (this rank's limits) before any
large allocation, and converted to RGB. Every problem raises ``InvalidRequestError`` naming
it; the adapter never raises anything else for bad input.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from dpinfer.config import ModelConfig
from dpinfer.errors import InvalidRequestError
from dpinfer.log import get_logger
from dpinfer.protocol.bodies import ChatMessage, ImageItem, RawImage
from dpinfer.tokenizer import multimodal as mm
from dpinfer.tokenizer.multimodal import PreparedPrompt
from dpinfer.tokenizer.request_parsing import check_token_ids

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

_RAW_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

__all__ = ["ImageLimits", "ImageProcessorAdapter", "PreparedPrompt", "decode_image", "images_hash"]


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may be (checked before decoding their pixels)."""

    max_images: int = 16
    """Images per request."""
    max_side: int = 8192
    """Longest side, in pixels."""
    max_pixels: int = 4096 * 4096
    """Width x height of one image."""
    max_aspect_ratio: float = 100.0
    """Longest over shortest side (resizing the short side up would blow up the long one)."""
    max_encoded_bytes: int = 32 * 2**20
    """Size of one encoded image file."""


class ImageProcessor(Protocol):
    """What this adapter needs of a ``transformers`` image processor."""

    def __call__(self, *, images: list[Image.Image], return_tensors: str) -> Mapping[str, torch.Tensor]: ...


class ImageProcessorAdapter:
    """Tokenizes prompts and turns their images into model inputs for one model.

    ``tokenizer`` may be passed to reuse one already loaded; the image processor is loaded
    with ``dpinfer.runner.registry.load_processor``. A text-only model gets an adapter too:
    it tokenizes, and refuses images with a clear error.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        from dpinfer.runner.registry import load_processor, load_tokenizer, resolve_model

        self.spec = resolve_model(model_config)
        self.limits = limits or ImageLimits()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_config)
        self.image_processor: ImageProcessor | None = None
        self.image_token_id = self.spec.image_token_id
        self.seq_len = self.spec.image_seq_length
        self.pixel_dtype: torch.dtype = getattr(torch, model_config.dtype)
        if self.spec.multimodal:
            self.image_processor = load_processor(model_config).image_processor
        self._bos = self._leading_special_ids()
        self._mark_ids = self._encode(mm.IMAGE_MARK)

    @property
    def supports_images(self) -> bool:
        return self.image_processor is not None

    # ------------------------------------------------------------------ entry points

    def prepare(
        self,
        prompt_text: str | None = None,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[ChatMessage] | None = None,
        images: Sequence[ImageItem] = (),
    ) -> PreparedPrompt:
        """Token ids, ``mm_inputs`` and ``mm_hash`` of exactly one of ``prompt_text`` /
        ``token_ids`` / ``messages`` with ``images`` (see the module docstring); these are
        the fields of a ``RequestBody``, whose own checks they have passed."""
        given = [x is not None for x in (prompt_text, token_ids, messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt text, token ids or messages")
        images = self._check_image_list(images)
        num = len(images)
        if messages is not None:
            text = self._render_chat(mm.flatten_messages(messages, num))
            ids = self._ids_from_text(text, num, prefix=[])
        elif prompt_text is not None:
            ids = self._ids_from_text(prompt_text, num, prefix=self._bos)
        else:
            assert token_ids is not None
            ids = self._token_id_marks(check_token_ids(token_ids, self.spec.vocab_size), num)
        return self._finish(ids, images)

    def process(
        self,
        input_ids: list[int],
        images: Sequence[ImageItem],
        model_inputs: Mapping[str, object] | None = None,
    ) -> PreparedPrompt:
        """The same for a prompt already tokenized with its ``<image>`` marks as text, or a
        checked token-id prompt (the ``RequestParser``'s ``MultimodalProcessor`` seam);
        token-id prompts follow the token-id rules of ``multimodal.py``."""
        if model_inputs is not None:
            raise InvalidRequestError("'model_inputs' is not supported; send the images in 'images'")
        images = self._check_image_list(images)
        ids = list(input_ids)
        if self.image_token_id is None:
            return PreparedPrompt(ids, None, None)
        marked = ids
        if self._mark_ids != [self.image_token_id]:
            marked = mm.replace_subsequence(ids, self._mark_ids)
            if mm.MARK in marked and self.image_token_id in marked:
                raise InvalidRequestError(
                    f"the prompt mixes {mm.IMAGE_MARK} marks with the model's image token "
                    f"(id {self.image_token_id}); use {mm.IMAGE_MARK} only"
                )
        if mm.MARK not in marked:
            marked = self._token_id_marks(ids, len(images))
        return self._finish(marked, images)

    # ------------------------------------------------------------------ prompt

    def _ids_from_text(self, text: str, num_images: int, prefix: list[int]) -> list[int]:
        if self.image_token_id is None:
            return prefix + self._encode(text)
        return prefix + mm.tokenize_with_marks(text, self._encode, self.image_token_id, num_images)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _leading_special_ids(self) -> list[int]:
        # What add_special_tokens=True puts in front (Llama's BOS); trailing ones (ByT5's
        # EOS) would end the prompt, so prompts never get them.
        plain = self._encode("a")
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i]
        return []

    def _render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self.spec.name!r} has no chat template; send a prompt")
        try:
            return str(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        except Exception as e:  # noqa: BLE001 - a template may raise anything for odd input
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from None

    def _token_id_marks(self, ids: list[int], num_images: int) -> list[int]:
        """Image tokens of a token-id prompt as marks; without any, images go in front
        (after a leading BOS)."""
        token = self.image_token_id
        if token is None:
            return ids
        if token not in ids:
            if not num_images:
                return ids
            k = len(self._bos) if self._bos and ids[: len(self._bos)] == self._bos else 0
            return ids[:k] + [mm.MARK] * num_images + ids[k:]
        if not num_images:
            raise InvalidRequestError(
                f"the prompt contains the model's image token (id {token}) but no images were sent"
            )
        return mm.marks_from_token_ids(ids, token, num_images, self.seq_len)

    # ------------------------------------------------------------------ images

    def _check_image_list(self, images: Sequence[ImageItem]) -> list[ImageItem]:
        if images and self.image_processor is None:
            raise InvalidRequestError(
                f"model {self.spec.name!r} is text-only and does not accept 'images'; remove them"
            )
        if len(images) > self.limits.max_images:
            raise InvalidRequestError(
                f"{len(images)} images in one request; at most {self.limits.max_images} are accepted"
            )
        return list(images)

    def _finish(self, marked_ids: list[int], items: Sequence[ImageItem]) -> PreparedPrompt:
        if not items:
            if mm.MARK in marked_ids:
                raise mm.mark_mismatch(marked_ids.count(mm.MARK), 0)
            return PreparedPrompt(marked_ids, None, None)
        assert self.image_token_id is not None and self.image_processor is not None
        ids = mm.expand_marks(marked_ids, self.image_token_id, self.seq_len, len(items))
        decoded = [decode_image(item, self.limits, i) for i, item in enumerate(items)]
        try:
            out = self.image_processor(images=decoded, return_tensors="pt")
        except (ValueError, OSError) as e:
            raise InvalidRequestError(f"the image processor rejected an image: {e}") from None
        pixel_values = out["pixel_values"].to(self.pixel_dtype)
        return PreparedPrompt(ids, {"pixel_values": pixel_values}, images_hash(decoded))


def decode_image(item: ImageItem, limits: ImageLimits, index: int = 0) -> Image.Image:
    """One image item (encoded bytes or a ``RawImage``) as an RGB ``PIL.Image``."""
    from PIL import Image

    where = f"images[{index}]"
    if isinstance(item, RawImage):
        height, width, channels = item.shape
        _check_size(width, height, limits, where)
        return Image.frombytes(_RAW_MODES[channels], (width, height), item.data).convert("RGB")
    return _decode_encoded(item, limits, where)


def _decode_encoded(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_encoded_bytes:
        raise InvalidRequestError(
            f"{where}: encoded image of {len(data)} bytes exceeds {limits.max_encoded_bytes} bytes"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_size(image.width, image.height, limits, where)  # before decoding pixels
            image.load()
            return image.convert("RGB")
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise InvalidRequestError(f"{where}: cannot decode image bytes ({type(e).__name__}: {e})") from None


def _check_size(width: int, height: int, limits: ImageLimits, where: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"{where}: image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InvalidRequestError(
            f"{where}: image of {width}x{height} pixels is too large (at most {limits.max_side} "
            f"per side and {limits.max_pixels} pixels)"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidRequestError(
            f"{where}: image of {width}x{height} pixels has an aspect ratio above {limits.max_aspect_ratio:g}"
        )


def images_hash(images: Sequence[Image.Image]) -> bytes:
    """blake2b of the images' decoded RGB pixels and sizes, in order."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(images).to_bytes(4, "little"))
    for image in images:
        digest.update(image.width.to_bytes(4, "little") + image.height.to_bytes(4, "little"))
        digest.update(image.tobytes())
    return digest.digest()
