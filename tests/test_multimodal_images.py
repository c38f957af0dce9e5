"""``ImageProcessorAdapter``: image decoding and limits, ``<image>`` placement, ``mm_hash``.

The tiny-llava processor (``LlavaProcessor``) is the reference for token ids and pixel values.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dpinfer.config import ModelConfig
from dpinfer.errors import InvalidRequestError
from dpinfer.protocol.bodies import ChatMessage, ImagePart, RawImage, TextPart
from dpinfer.runner.registry import load_processor
from dpinfer.tokenizer.images import ImageLimits, ImageProcessorAdapter, decode_image

LLAVA = ModelConfig(model="tiny-llava")
IMAGE_TOKEN = 259
SEQ = 64


def pixels(seed: int, height: int = 30, width: int = 50, channels: int = 3) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, channels), dtype=np.uint8)


def raw(array: np.ndarray) -> RawImage:
    return RawImage(array.shape, "uint8", array.tobytes())


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buf, format=fmt)
    return buf.getvalue()


def text_ids(adapter: ImageProcessorAdapter, text: str) -> list[int]:
    return list(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def adapter() -> ImageProcessorAdapter:
    return ImageProcessorAdapter(LLAVA)


@pytest.fixture(scope="module")
def text_only() -> ImageProcessorAdapter:
    return ImageProcessorAdapter(ModelConfig(model="tiny-llama"))


# ---------------------------------------------------------------------- placement


def test_matches_llava_processor(adapter: ImageProcessorAdapter) -> None:
    a, b = pixels(1), pixels(2, 70, 40)
    got = adapter.prepare(prompt_text="left <image> mid <image> right", images=[encoded(a), raw(b)])
    processor = load_processor(LLAVA)
    want = processor(
        images=[Image.fromarray(a), Image.fromarray(b)],
        text="left <extra_id_0> mid <extra_id_0> right",
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert got.input_ids == want["input_ids"][0].tolist()
    assert got.mm_inputs is not None
    assert torch.equal(got.mm_inputs["pixel_values"], want["pixel_values"]), "image order or values differ"
    assert got.input_ids.count(IMAGE_TOKEN) == 2 * SEQ


def test_mark_expands_in_place(adapter: ImageProcessorAdapter) -> None:
    got = adapter.prepare(prompt_text="ab<image>cd", images=[raw(pixels(1))])
    assert got.input_ids == text_ids(adapter, "ab") + [IMAGE_TOKEN] * SEQ + text_ids(adapter, "cd")


def test_no_mark_puts_images_in_front(adapter: ImageProcessorAdapter) -> None:
    images = [raw(pixels(1)), raw(pixels(2))]
    got = adapter.prepare(prompt_text="hello", images=images)
    assert got.input_ids == [IMAGE_TOKEN] * (2 * SEQ) + text_ids(adapter, "hello")
    by_ids = adapter.prepare(token_ids=text_ids(adapter, "hello"), images=images)
    assert by_ids.input_ids == got.input_ids


def test_chat_content_parts_and_front_placement(adapter: ImageProcessorAdapter) -> None:
    image = [raw(pixels(3))]
    parts = (ImagePart(), TextPart("what is it?"))
    system = ChatMessage("system", "be brief")
    with_part = adapter.prepare(messages=[system, ChatMessage("user", parts)], images=image)
    with_mark = adapter.prepare(messages=[system, ChatMessage("user", "<image>what is it?")], images=image)
    no_mark = adapter.prepare(messages=[system, ChatMessage("user", "what is it?")], images=image)
    assert with_part.input_ids == with_mark.input_ids == no_mark.input_ids
    rendered = adapter.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "X"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    before_user = rendered.split("X")[0]
    start = len(text_ids(adapter, before_user))
    assert no_mark.input_ids[start : start + SEQ] == [IMAGE_TOKEN] * SEQ, "image goes into the user turn"


def test_token_id_prompts(adapter: ImageProcessorAdapter) -> None:
    images = [raw(pixels(1)), raw(pixels(2))]
    one_each = [5, IMAGE_TOKEN, 6, IMAGE_TOKEN, 7]
    expanded = [5] + [IMAGE_TOKEN] * SEQ + [6] + [IMAGE_TOKEN] * SEQ + [7]
    assert adapter.prepare(token_ids=one_each, images=images).input_ids == expanded
    assert adapter.prepare(token_ids=expanded, images=images).input_ids == expanded
    with pytest.raises(InvalidRequestError, match="image tokens"):
        adapter.prepare(token_ids=[5, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN], images=images)
    with pytest.raises(InvalidRequestError, match="no images"):
        adapter.prepare(token_ids=[5, IMAGE_TOKEN])
    with pytest.raises(InvalidRequestError, match=r"prompt\[1\] = 10000 is out of vocabulary"):
        adapter.prepare(token_ids=[5, 10_000], images=images[:1])


def test_process_seam_finds_marks_in_tokenized_text(adapter: ImageProcessorAdapter) -> None:
    images = [raw(pixels(1))]
    ids = text_ids(adapter, "see <image> now")
    assert (
        adapter.process(ids, images).input_ids
        == adapter.prepare(prompt_text="see <image> now", images=images).input_ids
    )
    assert adapter.process(text_ids(adapter, "plain"), []).mm_inputs is None
    with pytest.raises(InvalidRequestError, match="model_inputs"):
        adapter.process(ids, images, {"pixel_values": []})
    with pytest.raises(InvalidRequestError, match="only 0 image"):
        adapter.process(ids, [])


def test_text_without_images_has_no_mm_inputs(adapter: ImageProcessorAdapter) -> None:
    got = adapter.prepare(prompt_text="just text")
    assert got == type(got)(text_ids(adapter, "just text"), None, None)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_text": "<image> and <image>", "images": [raw(pixels(1))]}, "2 <image> mark"),
        ({"prompt_text": "a <image> b", "images": [raw(pixels(1))] * 2}, "only 1 <image> mark"),
        ({"prompt_text": "a <image> b"}, "only 0 image"),
        ({"prompt_text": "x<extra_id_0>", "images": [raw(pixels(1))]}, "image token"),
        ({"prompt_text": "a", "token_ids": [5]}, "exactly one"),
        (
            {"messages": [ChatMessage("user", (ImagePart(), ImagePart()))], "images": [raw(pixels(1))]},
            "2 <image>",
        ),
    ],
)
def test_prompt_errors(adapter: ImageProcessorAdapter, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        adapter.prepare(**kwargs)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (b"definitely not an image", "images\\[0\\]: cannot decode"),
        (encoded(pixels(1))[:40], "cannot decode"),  # truncated PNG
    ],
)
def test_bad_image_items(adapter: ImageProcessorAdapter, item: bytes, match: str) -> None:
    # Raw images and item types are checked by RequestBody (tests/test_bad_input.py).
    with pytest.raises(InvalidRequestError, match=match):
        adapter.prepare(prompt_text="<image>x", images=[item])


def test_raw_image_is_checked_when_built() -> None:
    with pytest.raises(InvalidRequestError, match="1, 3 or 4 channels"):
        raw(pixels(1, channels=2))
    with pytest.raises(InvalidRequestError, match="needs 4500"):
        RawImage((30, 50, 3), "uint8", b"\x00" * 10)


def test_limits_are_checked_before_decoding() -> None:
    limits = ImageLimits(max_images=2, max_side=64, max_pixels=64 * 48, max_aspect_ratio=4)
    with pytest.raises(InvalidRequestError, match="too large"):
        decode_image(encoded(pixels(1, 40, 100)), limits)
    with pytest.raises(InvalidRequestError, match="too large"):
        decode_image(raw(pixels(1, 64, 64)), limits)
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        decode_image(raw(pixels(1, 5, 40)), limits)
    assert decode_image(encoded(pixels(1, 40, 60), "JPEG"), limits).size == (60, 40)


def test_too_many_images() -> None:
    adapter = ImageProcessorAdapter(LLAVA, limits=ImageLimits(max_images=2))
    with pytest.raises(InvalidRequestError, match="at most 2"):
        adapter.prepare(prompt_text="x", images=[raw(pixels(i)) for i in range(3)])


def test_text_only_model_refuses_images(text_only: ImageProcessorAdapter) -> None:
    assert not text_only.supports_images
    with pytest.raises(InvalidRequestError, match="text-only"):
        text_only.prepare(prompt_text="<image> hi", images=[raw(pixels(1))])
    with pytest.raises(InvalidRequestError, match="text-only"):
        text_only.process([5, 6], [raw(pixels(1))])
    plain = text_only.prepare(prompt_text="<image> hi")
    assert plain.mm_inputs is None and plain.input_ids == text_ids(text_only, "<image> hi")


# ---------------------------------------------------------------------- mm_hash


def test_mm_hash_follows_decoded_pixels(adapter: ImageProcessorAdapter) -> None:
    a, b = pixels(1), pixels(2)

    def prep(*images: Any) -> Any:
        return adapter.prepare(prompt_text="q", images=list(images))

    assert prep(encoded(a)).mm_hash == prep(raw(a)).mm_hash, "same pixels, different encodings"
    assert prep(raw(a)).mm_hash != prep(raw(b)).mm_hash
    assert prep(raw(a), raw(b)).mm_hash != prep(raw(b), raw(a)).mm_hash, "order matters"
    flipped = a.copy()
    flipped[0, 0, 0] ^= 1
    assert prep(raw(a)).mm_hash != prep(raw(flipped)).mm_hash, "one changed value changes the hash"
    rgba = np.concatenate([a, np.full((*a.shape[:2], 1), 7, np.uint8)], axis=2)
    assert prep(raw(rgba)).mm_hash == prep(raw(a)).mm_hash, "alpha is dropped (RGB content)"
    gray = pixels(4, channels=1)
    assert decode_image(raw(gray), ImageLimits()).mode == "RGB"
