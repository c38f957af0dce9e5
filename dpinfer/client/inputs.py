"""Turn what a caller passes (prompts, chat messages, images, sampling params) into request bodies.

The body, its fields and every check on them live in ``protocol.bodies.RequestBody``; this
module only turns Python-side conveniences into its fields: a prompt map's keys, token ids
given as numpy integers, image files, PIL images and numpy arrays (encoded bytes or a
``RawImage``; images are never pickled). ``request_body`` builds the ``RequestBody``, so a
malformed prompt raises ``InvalidRequestError`` in the caller's frame, with the message the
engine rank would have sent back. numpy and Pillow are optional and never imported here at
run time; an object is recognised as an array or a PIL image only if its module is loaded.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias, TypeGuard, cast

import msgspec

from dpinfer.errors import InvalidRequestError
from dpinfer.protocol import prefix_keys
from dpinfer.protocol.bodies import DEFAULT_SAMPLING, ImageItem, RawImage, RequestBody
from dpinfer.sampling import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from PIL import Image

Prompt: TypeAlias = str | Sequence[int] | Mapping[str, object]
"""One prompt: text, a list of token ids, or a map with ``prompt`` or chat ``messages``
(and optional ``images``)."""
ImageInput: TypeAlias = (
    "bytes | bytearray | memoryview | str | os.PathLike[str] | Image.Image | NDArray[np.uint8]"
)
"""Encoded image bytes, a file path, a PIL image, or a numpy HWC (or HW) ``uint8`` array."""
SamplingInput: TypeAlias = SamplingParams | Mapping[str, object] | None

_PROMPT_KEYS = frozenset({"prompt", "messages", "images"})


def is_single_prompt(prompts: object) -> bool:
    """Whether ``prompts`` is one prompt rather than a list of prompts.

    A ``str`` or a map is one prompt; a non-empty list of ints is one token-id prompt; any
    other list is a list of prompts.
    """
    if isinstance(prompts, str | Mapping):
        return True
    if isinstance(prompts, Sequence) and prompts:
        return all(_is_token_id(t) for t in prompts)
    return False


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """``prompts`` as a list of prompts (see ``is_single_prompt``); an empty list is an error."""
    if is_single_prompt(prompts):
        return [cast("Prompt", prompts)]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise InvalidRequestError(
            f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}"
        )
    if not prompts:
        raise InvalidRequestError("prompts is empty")
    return list(cast("Sequence[Prompt]", prompts))


def as_sampling_list(
    sampling_params: SamplingInput | Sequence[SamplingInput], count: int
) -> list[SamplingParams]:
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


def to_sampling_params(value: SamplingInput) -> SamplingParams:
    if value is None:
        return DEFAULT_SAMPLING
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        return SamplingParams.from_dict(value)
    raise InvalidRequestError(f"sampling_params must be SamplingParams or a map, got {type(value).__name__}")


def build_request(
    prompt: Prompt, sampling_params: SamplingInput = None, images: Sequence[ImageInput] | None = None
) -> RequestBody:
    """The checked ``RequestBody`` of one prompt; ``images`` adds to any images in a prompt map."""
    fields, prompt_images = _prompt_fields(prompt)
    fields["images"] = [*prompt_images, *(encode_image(im) for im in _image_list(images))]
    fields["sampling"] = to_sampling_params(sampling_params)
    return RequestBody.from_builtins(fields)


class KeyedBody(bytes):
    """A packed request body that carries its prefix keys (``protocol.prefix_keys``), which
    the session puts in the request's ``SubmitEntry`` for the hub's ``cache_aware`` routing:
    computed here, off the hub, over the body's canonical content. A completion of ``n``
    carries its ``group`` (``SubmitEntry.group``) and ``completion_index`` (``GenerationResult.index``)."""

    prefix_keys: bytes = b""
    group: int = 0
    completion_index: int = 0


def request_body(
    prompt: Prompt, sampling_params: SamplingInput = None, images: Sequence[ImageInput] | None = None
) -> bytes:
    """The packed request body of one prompt (see ``build_request``): a ``KeyedBody``."""
    request = build_request(prompt, sampling_params, images)
    body = KeyedBody(request.to_bytes())
    body.prefix_keys = prefix_keys.pack(prefix_keys.body_keys(request))
    return body


def single(sampling_params: SamplingInput, method: str) -> SamplingParams:
    """``sampling_params`` for a method that sends one completion (``n`` must be 1)."""
    sampling = to_sampling_params(sampling_params)
    if sampling.n != 1:
        parallel = method.replace("add_request", "add_parallel_requests")
        raise InvalidRequestError(
            f"n={sampling.n}: {method} sends one completion; use {parallel} (one handle per completion)"
        )
    return sampling


def completion_bodies(
    prompt: Prompt, sampling_params: SamplingInput = None, images: Sequence[ImageInput] | None = None
) -> list[bytes]:
    """The bodies of a prompt's ``SamplingParams.n`` completions, in ``index`` order.

    ``n == 1``: one body, as ``request_body``. Otherwise ``n`` bodies of one new random group
    id (``RequestBody.group``), each with ``n=1`` and completion ``j``'s seed
    (``SamplingParams.completions``); the prompt and images are encoded once.
    """
    sampling = to_sampling_params(sampling_params)
    if sampling.n == 1:
        return [request_body(prompt, sampling, images)]
    completions = sampling.completions()
    request = build_request(prompt, completions[0], images)
    keys = prefix_keys.pack(prefix_keys.body_keys(request))
    group = secrets.randbits(63) or 1
    bodies: list[bytes] = []
    for index, one in enumerate(completions):
        body = KeyedBody(msgspec.structs.replace(request, sampling=one, group=group).to_bytes())
        body.prefix_keys, body.group, body.completion_index = keys, group, index
        bodies.append(body)
    return bodies


def _prompt_fields(prompt: Prompt) -> tuple[dict[str, object], list[ImageItem]]:
    """The body fields of a prompt, and the images of a prompt map."""
    if not isinstance(prompt, Mapping):
        return {"prompt": _token_ids_as_ints(prompt)}, []
    unknown = set(prompt) - _PROMPT_KEYS
    if unknown:
        raise InvalidRequestError(
            f"unknown prompt key(s): {', '.join(sorted(map(str, unknown)))}; "
            f"use {', '.join(sorted(_PROMPT_KEYS))}"
        )
    fields = {key: prompt[key] for key in ("prompt", "messages") if key in prompt}
    if "prompt" in fields:
        fields["prompt"] = _token_ids_as_ints(fields["prompt"])
    return fields, [encode_image(im) for im in _image_list(prompt.get("images"))]


def _token_ids_as_ints(prompt: object) -> object:
    """numpy integers as ints; anything else is left for ``RequestBody`` to accept or refuse."""
    if isinstance(prompt, str | bytes | bytearray) or not isinstance(prompt, Sequence):
        return prompt
    return [t.__index__() if _is_int_like(t) else t for t in prompt]


def _is_int_like(t: object) -> bool:
    # numpy integers are accepted through __index__; bools are not token ids.
    return not isinstance(t, bool) and hasattr(t, "__index__")


def _is_token_id(t: object) -> bool:
    return _is_int_like(t) and cast("int", t).__index__() >= 0


def _image_list(images: object) -> list[ImageInput]:
    if images is None:
        return []
    if _is_array(images) or _is_pil(images) or isinstance(images, str | bytes | bytearray | os.PathLike):
        return [cast("ImageInput", images)]
    if isinstance(images, Sequence):
        return list(images)
    raise InvalidRequestError(f"images must be a list, got {type(images).__name__}")


def encode_image(image: ImageInput) -> ImageItem:
    """One image as it travels: encoded file bytes, or a ``uint8`` HWC ``RawImage``."""
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
        return RawImage((image.height, image.width, len(image.getbands())), "uint8", image.tobytes())
    if _is_array(image):
        return _array_image(image)
    raise InvalidRequestError(
        f"unsupported image type {type(image).__name__}: pass bytes, a path, a PIL image or a uint8 HWC array"
    )


def _array_image(array: NDArray[np.generic]) -> RawImage:
    if array.ndim == 2:
        array = array[:, :, None]
    data = sys.modules["numpy"].ascontiguousarray(array).tobytes()
    return RawImage(tuple(int(d) for d in array.shape), str(array.dtype), data)


def _is_array(obj: object) -> TypeGuard[NDArray[np.generic]]:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _is_pil(obj: object) -> TypeGuard[Image.Image]:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)
