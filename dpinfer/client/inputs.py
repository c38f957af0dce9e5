"""Turn what a caller passes (prompts, chat messages, images, sampling params) into request bodies.

A request body is the msgpack map described by ``protocol.REQUEST_BODY_FIELDS``. Everything
here is validated before anything is sent, so a malformed prompt raises
``InvalidRequestError`` in the caller's frame instead of coming back as a remote error.
Images are never pickled: encoded files travel as their bytes, decoded pixels as a raw
``{"shape", "dtype", "data"}`` map. numpy and Pillow are optional and never imported here;
an object is recognised as an array or a PIL image only if its module is already loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from dpinfer.errors import InvalidRequestError
from dpinfer.protocol import pack_body
from dpinfer.sampling import SamplingParams

Prompt: TypeAlias = str | Sequence[int] | Mapping[str, Any]
"""One prompt: text, a list of token ids, or a map with ``prompt`` or chat ``messages``
(and optional ``images``)."""
ImageInput: TypeAlias = Any
"""Encoded image bytes, a file path, a PIL image, or a numpy HWC ``uint8`` array."""
SamplingInput: TypeAlias = SamplingParams | Mapping[str, Any] | None

_PROMPT_KEYS = frozenset({"prompt", "messages", "images"})
_MAX_IMAGE_CHANNELS = 4


def is_single_prompt(prompts: Any) -> bool:
    """Whether ``prompts`` is one prompt rather than a list of prompts.

    A ``str`` or a map is one prompt; a non-empty list of ints is one token-id prompt; any
    other list is a list of prompts.
    """
    if isinstance(prompts, str | Mapping):
        return True
    if isinstance(prompts, Sequence) and prompts:
        return all(_is_token_id(t) for t in prompts)
    return False


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """``prompts`` as a list of prompts (see ``is_single_prompt``); an empty list is an error."""
    if is_single_prompt(prompts):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise InvalidRequestError(
            f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}"
        )
    if not prompts:
        raise InvalidRequestError("prompts is empty")
    return list(prompts)


def as_sampling_list(sampling_params: Any, count: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt: ``None`` (defaults) or one value for all, or a list of ``count``."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams | Mapping):
        return [to_sampling_params(sampling_params)] * count
    if not isinstance(sampling_params, Sequence):
        raise InvalidRequestError(
            f"sampling_params must be SamplingParams or a list of them, got {type(sampling_params).__name__}"
        )
    if len(sampling_params) != count:
        raise InvalidRequestError(f"got {len(sampling_params)} sampling params for {count} prompts")
    return [to_sampling_params(sp) for sp in sampling_params]


_DEFAULT_SAMPLING = SamplingParams()


def to_sampling_params(value: SamplingInput) -> SamplingParams:
    if value is None:
        return _DEFAULT_SAMPLING
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        return SamplingParams.from_dict(dict(value))
    raise InvalidRequestError(f"sampling_params must be SamplingParams or a map, got {type(value).__name__}")


def request_body(
    prompt: Prompt, sampling_params: SamplingInput = None, images: Sequence[ImageInput] | None = None
) -> bytes:
    """The packed request body of one prompt; ``images`` adds to any images in a prompt map."""
    body = _prompt_fields(prompt)
    extra_images = [encode_image(im) for im in _image_list(images)]
    if extra_images:
        body["images"] = [*body.get("images", []), *extra_images]
    body["sampling"] = to_sampling_params(sampling_params).to_dict()
    return pack_body(body)


def _prompt_fields(prompt: Prompt) -> dict[str, Any]:
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown prompt key(s): {', '.join(sorted(map(str, unknown)))}; "
                f"use {', '.join(sorted(_PROMPT_KEYS))}"
            )
        has_prompt, has_messages = "prompt" in prompt, "messages" in prompt
        if has_prompt == has_messages:
            raise InvalidRequestError("a prompt map needs exactly one of 'prompt' or 'messages'")
        body: dict[str, Any] = (
            {"prompt": _check_prompt(prompt["prompt"])}
            if has_prompt
            else {"messages": _check_messages(prompt["messages"])}
        )
        images = [encode_image(im) for im in _image_list(prompt.get("images"))]
        if images:
            body["images"] = images
        return body
    return {"prompt": _check_prompt(prompt)}


def _check_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        return prompt
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
        if not prompt:
            raise InvalidRequestError("token-id prompt is empty")
        for t in prompt:
            if not _is_token_id(t):
                raise InvalidRequestError(f"token ids must be non-negative ints, got {t!r}")
        return [int(t) for t in prompt]
    raise InvalidRequestError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} maps")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, Mapping)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidRequestError(f"messages[{i}] must be a map with str 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _is_token_id(t: Any) -> bool:
    # numpy integers are accepted through __index__; bools are not token ids.
    if isinstance(t, bool) or not hasattr(t, "__index__"):
        return False
    return t.__index__() >= 0


def _image_list(images: Any) -> list[ImageInput]:
    if images is None:
        return []
    if _is_array(images) or _is_pil(images) or isinstance(images, str | bytes | bytearray | os.PathLike):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    raise InvalidRequestError(f"images must be a list, got {type(images).__name__}")


def encode_image(image: ImageInput) -> bytes | dict[str, Any]:
    """One image as it travels: encoded file bytes, or a raw ``uint8`` HWC array map."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise InvalidRequestError("image bytes are empty")
        return data
    if isinstance(image, str | os.PathLike):
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidRequestError(f"cannot read image {os.fspath(image)!r}: {e.strerror}") from None
        if not data:
            raise InvalidRequestError(f"image file {os.fspath(image)!r} is empty")
        return data
    if _is_pil(image):
        if image.mode not in ("RGB", "L", "RGBA"):
            image = image.convert("RGB")
        channels = len(image.getbands())
        return _raw_image((image.height, image.width, channels), image.tobytes())
    if _is_array(image):
        return _array_image(image)
    raise InvalidRequestError(
        f"unsupported image type {type(image).__name__}: pass bytes, a path, a PIL image or a uint8 HWC array"
    )


def _array_image(array: Any) -> dict[str, Any]:
    if str(array.dtype) != "uint8":
        raise InvalidRequestError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= _MAX_IMAGE_CHANNELS:
        raise InvalidRequestError(
            f"image arrays must be HWC with 1-4 channels, got shape {tuple(array.shape)}"
        )
    np = sys.modules["numpy"]
    return _raw_image(tuple(int(d) for d in array.shape), np.ascontiguousarray(array).tobytes())


def _raw_image(shape: tuple[int, ...], data: bytes) -> dict[str, Any]:
    if 0 in shape:
        raise InvalidRequestError(f"image has an empty dimension: shape {shape}")
    return {"shape": list(shape), "dtype": "uint8", "data": data}


def _is_array(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _is_pil(obj: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)
