"""Prefix keys: what cache-aware routing matches, computed from a request body off the hub.

A request's keys are a chain of 8-byte hashes over fixed-size blocks of its canonical
content: ``key[j]`` names the content prefix ``[0, (j + 1) * block)``, so two requests share
``key[j]`` exactly when they share that whole prefix (and the seed). Only full blocks get a
key, at most ``MAX_KEYS`` per request (the first ``MAX_KEYS * block`` units of content).

Canonical content and blocks:

- a text prompt: its characters, ``BLOCK_CHARS`` per block;
- chat messages: for each message ``role + "\\x1f" + content + "\\x1e"`` (content as text,
  each image part an ``<image>`` mark), ``BLOCK_CHARS`` characters per block;
- a token-id prompt: its ids, ``BLOCK_TOKENS`` per block (packed as little-endian uint32).

The seed holds the content's kind and the hash of every image (encoded bytes, or a raw
image's shape and pixels): requests with different images never share a key, as the rank's
radix cache gives each set of images its own namespace. A body with ``model_inputs`` (opaque
to everyone but the model) has no keys. A continuation (``resume``) has its prompt's keys.

Who computes them: the SDK (``client.inputs.request_body``; the HTTP front builds bodies
through it) puts them in ``SubmitEntry.prefix_keys``, where only the hub reads them; each
rank computes them again from the body it decodes anyway (``tokenizer.prefix_positions``),
so a client's keys steer only its own requests, never what the hub believes a rank holds.
Keys travel packed: ``KEY_BYTES`` each, little-endian (``pack``/``unpack``).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

from dpinfer.protocol.bodies import ChatMessage, ContentPart, ImageItem, RawImage, RequestBody, TextPart

BLOCK_CHARS = 128
"""Characters of text (or of canonical chat content) per key."""
BLOCK_TOKENS = 32
"""Token ids per key of a token-id prompt."""
MAX_KEYS = 32
"""Most keys one request carries (256 header bytes)."""
KEY_BYTES = 8
MAX_KEYS_BYTES = MAX_KEYS * KEY_BYTES
ROLE_END = "\x1f"
MESSAGE_END = "\x1e"
IMAGE_MARK = "<image>"


assert sys.byteorder == "little", "prefix keys are packed little-endian in native order"


def pack(keys: Sequence[int]) -> bytes:
    return array("Q", keys).tobytes()


def unpack(blob: bytes | memoryview) -> list[int]:
    """The keys of a packed blob (a trailing partial key is ignored)."""
    n = len(blob) // KEY_BYTES
    if not n:
        return []
    return memoryview(blob)[: n * KEY_BYTES].cast("Q").tolist()


def _image_digest(image: ImageItem) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, RawImage):
        h.update(repr((image.shape, image.dtype)).encode())
        h.update(image.data)
    else:
        h.update(image)
    return h.digest()


def _seed(kind: bytes, images: Sequence[ImageItem]) -> bytes:
    return kind + b"".join(_image_digest(im) for im in images)


def chain(seed: bytes, blocks: Sequence[bytes]) -> list[int]:
    """``key[j] = H(key[j-1] || block[j])`` (``key[-1]`` = the seed), 8-byte blake2b."""
    keys: list[int] = []
    prev = hashlib.blake2b(seed, digest_size=KEY_BYTES).digest()
    for block in blocks:
        prev = hashlib.blake2b(prev + block, digest_size=KEY_BYTES).digest()
        keys.append(int.from_bytes(prev, "little"))
    return keys


def chat_text(messages: Sequence[ChatMessage]) -> str:
    """The canonical content of chat messages (see the module docstring)."""
    parts = []
    for m in messages:
        parts.append(m.role)
        parts.append(ROLE_END)
        parts.append(content_text(m.content))
        parts.append(MESSAGE_END)
    return "".join(parts)


def content_text(content: str | Sequence[ContentPart]) -> str:
    """A message's content as one string, each image part an ``<image>`` mark."""
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, TextPart) else IMAGE_MARK for part in content)


def text_blocks(text: str, limit: int = MAX_KEYS) -> list[bytes]:
    n = min(len(text) // BLOCK_CHARS, limit)
    return [text[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS].encode("utf-8", "surrogatepass") for i in range(n)]


def token_blocks(ids: Sequence[int], limit: int = MAX_KEYS) -> list[bytes]:
    n = min(len(ids) // BLOCK_TOKENS, limit)
    return [array("I", ids[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]).tobytes() for i in range(n)]


def body_keys(body: RequestBody) -> list[int]:
    """The prefix keys of one request body (empty for bodies with ``model_inputs``)."""
    if body.model_inputs is not None:
        return []
    if body.messages is not None:
        return chain(_seed(b"chat", body.images), text_blocks(chat_text(body.messages)))
    if isinstance(body.prompt, str):
        return chain(_seed(b"text", body.images), text_blocks(body.prompt))
    assert body.prompt is not None
    try:
        blocks = token_blocks(body.prompt)
    except OverflowError:  # an id beyond uint32: no model has one; such a prompt goes by load
        return []
    return chain(_seed(b"ids", body.images), blocks)
