"""Validate one untrusted request body and tokenize it (the TokenizerProcess's pure core).

``RequestParser.parse(raw)`` returns a ``TokenizedRequest`` or raises
``InvalidRequestError`` whose message tells the caller what to fix. It never raises
anything else for bad input: the body is a msgpack map with the keys of
``protocol.REQUEST_BODY_FIELDS`` (exactly one of ``prompt`` / ``messages``).

Images: a model with a ``MultimodalProcessor`` turns ``images`` (and ``model_inputs``)
into ``mm_inputs``; a text-only model rejects them with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dpinfer.errors import InvalidRequestError, ProtocolError
from dpinfer.protocol import REQUEST_BODY_FIELDS, unpack_body
from dpinfer.protocol.local import RawRequest, TokenizedRequest
from dpinfer.sampling import SamplingParams

MESSAGE_FIELDS = frozenset({"role", "content"})


@dataclass(frozen=True)
class MultimodalResult:
    input_ids: list[int]
    """Prompt ids with every image placeholder expanded to the model's image tokens."""
    mm_inputs: Any
    """Model inputs for the images (e.g. ``{"pixel_values": tensor}``), sent with the request."""
    mm_hash: bytes | None
    """Stable hash of the image content; keys the prefix cache so images never alias."""


class MultimodalProcessor(Protocol):
    """The seam for vision-language models (the text-only path passes ``None``).

    ``process`` gets the tokenized prompt (placeholders from the prompt or chat template),
    the raw ``images`` list of the body and its ``model_inputs`` map (or ``None``); it
    raises ``InvalidRequestError`` for an image it cannot read or a placeholder count that
    does not match the images.
    """

    def process(
        self, input_ids: list[int], images: list[Any], model_inputs: dict[str, Any] | None
    ) -> MultimodalResult: ...


def appends_eos(tokenizer: Any) -> bool:
    """Whether ``add_special_tokens=True`` appends EOS (ByT5/T5 do); then prompts must skip it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


@dataclass
class RequestParser:
    """Everything needed to turn a body into a ``TokenizedRequest`` for one model."""

    tokenizer: Any
    model_name: str
    vocab_size: int
    """Token ids must be in ``[0, vocab_size)``."""
    max_prompt_len: int
    """Longest accepted prompt, in tokens (the scheduler's context minus room to generate)."""
    add_special_tokens: bool = True
    """For plain prompts; False for tokenizers that would append EOS (see ``appends_eos``)."""
    mm_processor: MultimodalProcessor | None = None

    def parse(self, raw: RawRequest) -> TokenizedRequest:
        body = self._decode(raw.body)
        sampling = SamplingParams.from_dict(body.get("sampling"))
        images = body.get("images")
        model_inputs = body.get("model_inputs")
        multimodal = bool(images) or model_inputs is not None
        if multimodal and self.mm_processor is None:
            field = "images" if images else "model_inputs"
            raise InvalidRequestError(
                f"model {self.model_name!r} is text-only and does not accept '{field}'; remove it"
            )
        input_ids = self._prompt_ids(body)
        mm_inputs, mm_hash = None, None
        if multimodal:
            assert self.mm_processor is not None
            if images is not None and not isinstance(images, list):
                raise InvalidRequestError(f"images must be a list, got {type(images).__name__}")
            if model_inputs is not None and not isinstance(model_inputs, dict):
                raise InvalidRequestError(f"model_inputs must be a map, got {type(model_inputs).__name__}")
            if (
                body.get("messages") is not None
                and model_inputs is None
                and hasattr(self.mm_processor, "prepare")
            ):
                # Chat: unmarked images go to the start of the first user turn, not before the
                # whole templated prompt, so the adapter renders the template itself.
                result = self.mm_processor.prepare(messages=body["messages"], images=images or [])
            else:
                result = self.mm_processor.process(input_ids, images or [], model_inputs)
            input_ids, mm_inputs, mm_hash = result.input_ids, result.mm_inputs, result.mm_hash
        self._check_len(input_ids)
        return TokenizedRequest(
            request_id=raw.request_id,
            input_ids=input_ids,
            sampling=sampling,
            stream=raw.stream,
            mm_inputs=mm_inputs,
            mm_hash=mm_hash,
        )

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _decode(body: bytes) -> dict[str, Any]:
        try:
            data = unpack_body(body, "request body")
        except ProtocolError as e:
            raise InvalidRequestError(str(e)) from None
        unknown = sorted(str(k) for k in data if k not in REQUEST_BODY_FIELDS)
        if unknown:
            valid = ", ".join(sorted(REQUEST_BODY_FIELDS))
            raise InvalidRequestError(f"unknown request field(s): {', '.join(unknown)} (valid: {valid})")
        return data

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        has_prompt, has_messages = "prompt" in body, "messages" in body
        if has_prompt == has_messages:
            raise InvalidRequestError("a request needs exactly one of 'prompt' or 'messages'")
        if has_messages:
            return self._chat_ids(body["messages"])
        prompt = body["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            ids = list(self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"])
            if not ids:
                raise InvalidRequestError("prompt is empty after tokenization")
            return ids
        if isinstance(prompt, list | tuple):
            return self._check_token_ids(prompt)
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )

    def _check_token_ids(self, ids: Sequence[Any]) -> list[int]:
        if not ids:
            raise InvalidRequestError("prompt is empty (no token ids)")
        for i, t in enumerate(ids):
            if type(t) is not int:
                raise InvalidRequestError(f"prompt[{i}] must be an integer token id, got {type(t).__name__}")
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(
                    f"prompt[{i}] = {t} is out of vocabulary (valid ids: 0..{self.vocab_size - 1})"
                )
        return list(ids)

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list | tuple) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of {role, content} maps")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidRequestError(f"messages[{i}] must be a map, got {type(m).__name__}")
            extra = sorted(str(k) for k in m if k not in MESSAGE_FIELDS)
            if extra:
                raise InvalidRequestError(f"messages[{i}] has unknown field(s): {', '.join(extra)}")
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise InvalidRequestError(f"messages[{i}].role must be a non-empty string")
            content = m.get("content")
            if not isinstance(content, str) and not (self.mm_processor and isinstance(content, list)):
                raise InvalidRequestError(f"messages[{i}].content must be a string")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name!r} has no chat template; send 'prompt' instead"
            )
        try:
            encoded = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as e:  # noqa: BLE001 - a template may raise anything for odd input
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from None
        ids = list(encoded["input_ids"])
        if not ids:
            raise InvalidRequestError("messages produced an empty prompt")
        return ids

    def _check_len(self, input_ids: list[int]) -> None:
        if len(input_ids) > self.max_prompt_len:
            raise InvalidRequestError(
                f"prompt has {len(input_ids)} tokens; model {self.model_name!r} accepts at most "
                f"{self.max_prompt_len} on this rank"
            )
