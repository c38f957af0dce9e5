"""Decode one untrusted request body and tokenize it (the TokenizerProcess's pure core).

``RequestParser.parse(raw)`` returns a ``TokenizedRequest`` or raises
``InvalidRequestError`` whose message tells the caller what to fix; it never raises
anything else for bad input. The body's shape and every model-independent rule are
``protocol.bodies.RequestBody``'s (decoded with ``RequestBody.from_bytes``); this module
adds only what depends on the model: token ids within its vocabulary, a chat template,
the prompt length limit of this rank, and whether it takes images at all.

Images: a model with a ``MultimodalProcessor`` turns ``images`` (and ``model_inputs``)
into ``mm_inputs``; a text-only model rejects them with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec

from dpinfer.errors import InvalidRequestError
from dpinfer.protocol.bodies import ChatMessage, ImageItem, RequestBody
from dpinfer.protocol.local import RawRequest, TokenizedRequest
from dpinfer.tokenizer.multimodal import PreparedPrompt
from dpinfer.tokenizer.prefix_positions import PositionMapper

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class MultimodalProcessor(Protocol):
    """The seam for vision-language models (the text-only path passes ``None``).

    ``process`` gets the tokenized prompt (``<image>`` marks as text, or a token-id prompt),
    the body's images and its ``model_inputs`` map (or ``None``); ``prepare`` gets chat
    messages with images, so that unmarked images land in the first user turn rather than
    before the whole templated prompt. Both raise ``InvalidRequestError`` for an image they
    cannot read or a placeholder count that does not match the images.
    """

    def process(
        self,
        input_ids: list[int],
        images: Sequence[ImageItem],
        model_inputs: Mapping[str, object] | None = None,
    ) -> PreparedPrompt: ...

    def prepare(self, *, messages: Sequence[ChatMessage], images: Sequence[ImageItem]) -> PreparedPrompt: ...


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``add_special_tokens=True`` appends EOS (ByT5/T5 do); then prompts must skip it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[-1] == eos and (not without or without[-1] != eos)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """A token-id prompt whose ids are all in ``[0, vocab_size)``, as a list."""
    if not ids:
        raise InvalidRequestError("prompt is empty (no token ids)")
    for i, t in enumerate(ids):
        if type(t) is not int:
            raise InvalidRequestError(f"prompt[{i}] must be an integer token id, got {type(t).__name__}")
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"prompt[{i}] = {t} is out of vocabulary (valid token ids: 0..{vocab_size - 1})"
            )
    return list(ids)


MAX_BODY_BYTES = 64 << 20
"""Largest request body a rank decodes (images included); the coordinator's frame limit is larger."""


@dataclass
class RequestParser:
    """Everything needed to turn a body into a ``TokenizedRequest`` for one model."""

    tokenizer: PreTrainedTokenizerBase
    model_name: str
    vocab_size: int
    """Token ids must be in ``[0, vocab_size)``."""
    max_prompt_len: int
    """Longest accepted prompt, in tokens (the scheduler's context minus room to generate)."""
    add_special_tokens: bool = True
    """For plain prompts; False for tokenizers that would append EOS (see ``appends_eos``)."""
    mm_processor: MultimodalProcessor | None = None
    max_token_bytes: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    """The most UTF-8 bytes one token of this tokenizer stands for (``max_token_bytes``)."""
    positions: PositionMapper | None = None
    """Set while the hub routes ``cache_aware``: each request gets its routing keys."""

    def parse(self, raw: RawRequest) -> TokenizedRequest:
        if len(raw.body) > self.max_body_bytes:
            raise InvalidRequestError(
                f"request body of {len(raw.body)} bytes; at most {self.max_body_bytes} are accepted"
            )
        body = RequestBody.from_bytes(raw.body)
        if body.images or body.model_inputs is not None:
            prepared = self._multimodal(body)
        else:
            prepared = PreparedPrompt(self._prompt_ids(body), None, None)
        resume = body.resume
        if resume is not None and max(resume.token_ids) >= self.vocab_size:
            raise InvalidRequestError(
                f"resume.token_ids holds {max(resume.token_ids)}: out of vocabulary "
                f"(valid token ids: 0..{self.vocab_size - 1})"
            )
        if len(prepared.input_ids) > self.max_prompt_len:
            raise InvalidRequestError(
                f"prompt has {len(prepared.input_ids)} tokens; model {self.model_name!r} accepts at "
                f"most {self.max_prompt_len} on this rank"
            )
        return TokenizedRequest(
            request_id=raw.request_id,
            input_ids=prepared.input_ids,
            sampling=body.sampling,
            stream=raw.stream,
            mm_inputs=prepared.mm_inputs,
            mm_hash=prepared.mm_hash,
            resume_ids=resume.token_ids if resume is not None else (),
            resume_chars=resume.text_chars if resume is not None else 0,
            cache_keys=self.positions.cache_keys(body, prepared.input_ids) if self.positions else (),
            group=body.group,
        )

    # ------------------------------------------------------------------ pieces

    def _multimodal(self, body: RequestBody) -> PreparedPrompt:
        if self.mm_processor is None:
            field = "images" if body.images else "model_inputs"
            raise InvalidRequestError(
                f"model {self.model_name!r} is text-only and does not accept '{field}'; remove it"
            )
        if body.messages is not None and body.model_inputs is None:
            return self.mm_processor.prepare(messages=body.messages, images=body.images)
        return self.mm_processor.process(self._prompt_ids(body), body.images, body.model_inputs)

    def _prompt_ids(self, body: RequestBody) -> list[int]:
        if body.messages is not None:
            return self._chat_ids(body.messages)
        if isinstance(body.prompt, str):
            self._check_size(len(body.prompt.encode()), "prompt")
            encoded = self.tokenizer(body.prompt, add_special_tokens=self.add_special_tokens)
            ids = list(encoded["input_ids"])
            if not ids:
                raise InvalidRequestError("prompt is empty after tokenization")
            return ids
        assert body.prompt is not None, "RequestBody holds a prompt or messages"
        return check_token_ids(body.prompt, self.vocab_size)

    def _check_size(self, num_bytes: int, what: str) -> None:
        """Refuse text that cannot fit before tokenizing it: a token covers at most
        ``max_token_bytes`` bytes, so more bytes than that many tokens' worth is too long."""
        limit = self.max_prompt_len * self.max_token_bytes
        if num_bytes > limit:
            raise InvalidRequestError(
                f"{what} of {num_bytes} bytes cannot fit in {self.max_prompt_len} tokens (model "
                f"{self.model_name!r}: at most {limit} bytes); shorten it"
            )

    def _chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        self._check_size(sum(len(_text_of(m).encode()) for m in messages), "messages")
        if self.mm_processor is None:
            for i, m in enumerate(messages):
                if not isinstance(m.content, str):
                    raise InvalidRequestError(
                        f"messages[{i}].content must be a string: model {self.model_name!r} is text-only"
                    )
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name!r} has no chat template; send 'prompt' instead"
            )
        try:
            encoded = self.tokenizer.apply_chat_template(
                msgspec.to_builtins(messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as e:  # noqa: BLE001 - a template may raise anything for odd input
            raise InvalidRequestError(f"the chat template rejected the messages: {e}") from None
        assert isinstance(encoded, Mapping), "return_dict=True gives a BatchEncoding"
        ids = list(encoded["input_ids"])
        if not ids:
            raise InvalidRequestError("messages produced an empty prompt")
        return ids


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(getattr(part, "text", "") for part in message.content)


def max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest UTF-8 expansion of any single token (1 for byte tokenizers such as ByT5)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return max(1, *(len(text.encode()) for text in texts))
