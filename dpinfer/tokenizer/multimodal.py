"""Where a prompt's images go: ``<image>`` marks, chat content lists, image-token expansion.

Rules (the same for every model; ``ImageProcessorAdapter`` in ``images.py`` applies them):

- Text prompts and chat messages mark each image's place with ``IMAGE_MARK`` (``<image>``),
  the i-th mark being the i-th image. Chat content may also be a list of parts
  (``TextPart``, ``ImagePart`` of ``protocol.bodies``); an image part is a mark.
- A prompt without any mark gets all its images in front: before the text, or at the start
  of the first user message.
- Token-id prompts mark images with the model's image token: either one image token per
  image (expanded here) or ``image_seq_length`` per image (already expanded).
- Each mark becomes ``image_seq_length`` image tokens. Marks and images must match in
  number; the model's image token typed as text (outside a mark) is refused, because it
  would take a feature vector that does not belong to it.

Every problem raises ``InvalidRequestError`` with a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpinfer.errors import InvalidRequestError
from dpinfer.protocol.bodies import ChatMessage, ContentPart, ImagePart

if TYPE_CHECKING:
    import torch

IMAGE_MARK = "<image>"

MARK = -1
"""Stand-in for one image mark inside a token list before expansion (never a real id)."""


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for the Scheduler's ``TokenizedRequest`` (what a multimodal processor returns)."""

    input_ids: list[int]
    """Token ids; each image is ``image_seq_length`` image tokens at its place."""
    mm_inputs: dict[str, torch.Tensor] | None
    """``{"pixel_values": tensor}`` for the images, ``None`` without images."""
    mm_hash: bytes | None
    """Content hash of the decoded images (``None`` without images)."""


def mark_mismatch(num_marks: int, num_images: int) -> InvalidRequestError:
    if num_marks > num_images:
        return InvalidRequestError(
            f"the prompt has {num_marks} {IMAGE_MARK} mark(s) but only {num_images} image(s) "
            f"were sent; send one image per mark"
        )
    return InvalidRequestError(
        f"{num_images} image(s) were sent but the prompt has only {num_marks} {IMAGE_MARK} "
        f"mark(s); add a mark for each image, or none to put every image in front"
    )


def flatten_messages(messages: Sequence[ChatMessage], num_images: int) -> list[dict[str, str]]:
    """Chat messages as ``{"role", "content"}`` maps with string content (image parts become marks).

    If no message marks an image, ``num_images`` marks are put at the start of the first
    user message (the first message if none has the role ``user``).
    """
    assert messages, "a RequestBody never has an empty messages list"
    out = [{"role": m.role, "content": content_text(m.content)} for m in messages]
    if num_images and not any(IMAGE_MARK in m["content"] for m in out):
        first_user = next((m for m in out if m["role"] == "user"), out[0])
        first_user["content"] = IMAGE_MARK * num_images + first_user["content"]
    return out


def content_text(content: str | Sequence[ContentPart]) -> str:
    """A message's content as one string, each image part an ``IMAGE_MARK``."""
    if isinstance(content, str):
        return content
    return "".join(IMAGE_MARK if isinstance(part, ImagePart) else part.text for part in content)


def tokenize_with_marks(
    text: str, encode: Callable[[str], list[int]], image_token_id: int, num_images: int
) -> list[int]:
    """``text`` tokenized piece by piece around its ``<image>`` marks (each a ``MARK``).

    Without marks, ``num_images`` marks go in front of the text.
    """
    pieces = text.split(IMAGE_MARK)
    if len(pieces) == 1 and num_images:
        pieces = [""] * num_images + pieces
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(MARK)
        if piece:
            piece_ids = encode(piece)
            if image_token_id in piece_ids:
                raise InvalidRequestError(
                    f"the prompt text contains the model's image token (id {image_token_id}); "
                    f"mark images with {IMAGE_MARK} instead"
                )
            ids.extend(piece_ids)
    return ids


def marks_from_token_ids(ids: list[int], image_token_id: int, num_images: int, seq_len: int) -> list[int]:
    """A token-id prompt with its image tokens turned into ``MARK``s (see the module rules)."""
    count = sum(1 for t in ids if t == image_token_id)
    if count == 0 and num_images:
        return [MARK] * num_images + ids
    if count == num_images:
        return [MARK if t == image_token_id else t for t in ids]
    if count == num_images * seq_len and _runs_of(ids, image_token_id, seq_len):
        out: list[int] = []
        skip = 0
        for t in ids:
            if t == image_token_id:
                if skip == 0:
                    out.append(MARK)
                    skip = seq_len
                skip -= 1
            else:
                out.append(t)
        return out
    raise InvalidRequestError(
        f"the token-id prompt has {count} image tokens (id {image_token_id}) for {num_images} "
        f"image(s): use one per image, or {seq_len} per image, or none to put images in front"
    )


def _runs_of(ids: list[int], token: int, seq_len: int) -> bool:
    """Whether every run of ``token`` has a length that is a multiple of ``seq_len``."""
    run = 0
    for t in [*ids, None]:
        if t == token:
            run += 1
        elif run:
            if run % seq_len:
                return False
            run = 0
    return True


def replace_subsequence(ids: list[int], pattern: list[int]) -> list[int]:
    """``ids`` with every (non-overlapping) occurrence of ``pattern`` replaced by one ``MARK``."""
    if not pattern:
        return list(ids)
    out: list[int] = []
    i, n = 0, len(pattern)
    while i < len(ids):
        if ids[i : i + n] == pattern:
            out.append(MARK)
            i += n
        else:
            out.append(ids[i])
            i += 1
    return out


def expand_marks(ids: list[int], image_token_id: int, seq_len: int, num_images: int) -> list[int]:
    """Each ``MARK`` as ``seq_len`` image tokens; marks and images must match in number."""
    num_marks = sum(1 for t in ids if t == MARK)
    if num_marks != num_images:
        raise mark_mismatch(num_marks, num_images)
    out: list[int] = []
    for t in ids:
        if t == MARK:
            out.extend([image_token_id] * seq_len)
        else:
            out.append(t)
    return out
