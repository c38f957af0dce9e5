"""Responses in the OpenAI schema, built as dicts or byte templates (no models on the hot path).

``Reply`` holds what every response and chunk of one request repeats (``id``, ``created``,
``model``); a streamed request's chunks are byte templates around its JSON-encoded text, so a
streamed token costs one ``msgspec.json.encode`` of a string.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from dpinfer.http.logprobs import chat_logprobs, completion_logprobs
from dpinfer.outputs import GenerationResult, StreamDelta

encode_json = msgspec.json.encode
_encode = encode_json
_ids = itertools.count(1)
_ID_PREFIX = secrets.token_hex(6)


def new_id(prefix: str) -> str:
    """``cmpl-...``/``chatcmpl-...``: unique per API worker (random prefix) and cheap."""
    return f"{prefix}-{_ID_PREFIX}{next(_ids):x}"


def usage(results: Sequence[GenerationResult], n: int) -> dict[str, object]:
    """Prompt tokens once per prompt (not per choice, as OpenAI counts), completion tokens of all;
    ``prompt_tokens_details.cached_tokens``: of the prompt tokens, those the prefix cache served
    (per prompt, its choice that read the fewest: the one that prefilled it for the others)."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    cached = sum(min(r.cached_tokens for r in results[i : i + n]) for i in range(0, len(results), n))
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }  # fmt: skip


@dataclass(slots=True)
class Reply:
    """One request's response identity, and its renderings."""

    chat: bool
    model: str
    top_logprobs: int | None = None
    """Most likely tokens to show per token when logprobs were asked for (``None``: not asked)."""
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())

    # ------------------------------------------------------------------ whole responses

    def response(self, results: Sequence[GenerationResult], n: int) -> bytes:
        if self.chat:
            choices: list[dict[str, object]] = [
                {"index": i, "message": {"role": "assistant", "content": r.text},
                 "logprobs": self.logprobs(r), "finish_reason": r.finish_reason, "stop_reason": r.stop_reason}
                for i, r in enumerate(results)
            ]  # fmt: skip
        else:
            choices = [
                {"index": i, "text": r.text, "logprobs": self.logprobs(r), "finish_reason": r.finish_reason,
                 "stop_reason": r.stop_reason}
                for i, r in enumerate(results)
            ]  # fmt: skip
        return _encode({
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices, "usage": usage(results, n),
        })  # fmt: skip

    def logprobs(self, out: GenerationResult | StreamDelta, offset: int = 0) -> dict[str, object] | None:
        """``choices[].logprobs`` of a result or delta (a completion chunk's tokens start at
        ``offset`` characters); ``None`` unless asked for."""
        if self.top_logprobs is None or out.logprobs is None:
            return None
        texts = out.token_texts or {}
        if self.chat:
            return chat_logprobs(out.token_ids, out.logprobs, texts, self.top_logprobs)
        return completion_logprobs(out.token_ids, out.logprobs, texts, offset)[0]

    # ------------------------------------------------------------------ stream chunks

    def chunks(self, include_usage: bool) -> ChunkWriter:
        return ChunkWriter(self, include_usage)


class ChunkWriter:
    """SSE events (``data: {...}\\n\\n``) of one streamed request."""

    __slots__ = ("_chat", "_content_key", "_end", "_head", "_offsets", "_reply", "_usage_head")

    def __init__(self, reply: Reply, include_usage: bool) -> None:
        self._chat = reply.chat
        self._reply = reply
        self._offsets: dict[int, int] = {}
        """Per completion choice: characters of token text so far (``text_offset``)."""
        kind = "chat.completion.chunk" if reply.chat else "text_completion"
        common = (
            b'{"id":' + _encode(reply.id) + b',"object":"' + kind.encode() + b'","created":'
            + str(reply.created).encode() + b',"model":' + _encode(reply.model)
        )  # fmt: skip
        self._head = b"data: " + common + b',"choices":[{"index":'
        self._usage_head = b"data: " + common + b',"choices":[],"usage":'
        self._content_key = b',"delta":{"content":' if reply.chat else b',"text":'
        # With include_usage every chunk but the last carries "usage": null (OpenAI's contract).
        self._end = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def role(self, index: int) -> bytes:
        """A chat choice's first chunk: the role, and no content yet."""
        return (
            self._head + str(index).encode()
            + b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null' + self._end
        )  # fmt: skip

    def text(self, index: int, text: str, delta: StreamDelta | None = None) -> bytes:
        """A chunk of ``text`` (and, when asked for, the logprobs of ``delta``'s tokens)."""
        close = b"}" if self._chat else b""
        logprobs = b"null"
        if delta is not None and delta.logprobs is not None and self._reply.top_logprobs is not None:
            offset = self._offsets.get(index, 0)
            logprobs = _encode(self._reply.logprobs(delta, offset))
            self._offsets[index] = offset + sum(
                len((delta.token_texts or {}).get(t, "")) for t in delta.token_ids
            )
        return (
            self._head + str(index).encode() + self._content_key + _encode(text) + close
            + b',"logprobs":' + logprobs + b',"finish_reason":null' + self._end
        )  # fmt: skip

    def finish(self, index: int, reason: str, stop_reason: str | int | None = None) -> bytes:
        body = b',"delta":{}' if self._chat else b',"text":""'
        return (
            self._head + str(index).encode() + body + b',"logprobs":null,"finish_reason":'
            + _encode(reason) + b',"stop_reason":' + _encode(stop_reason) + self._end
        )  # fmt: skip

    def usage(self, results: Sequence[GenerationResult], n: int) -> bytes:
        return self._usage_head + _encode(usage(results, n)) + b"}\n\n"


DONE = b"data: [DONE]\n\n"


def error_event(error_body: bytes) -> bytes:
    return b"data: " + error_body + b"\n\n"
