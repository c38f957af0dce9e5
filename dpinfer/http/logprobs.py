"""Token logprobs in OpenAI's two shapes, from a result's (or delta's) logprobs and token texts.

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}, ...]}]}``, ``top_logprobs`` holding the ``top_logprobs`` most likely tokens;
- completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
  each ``top_logprobs`` map holding the ``logprobs`` most likely tokens and the sampled one
  (as vLLM's; tokens of one text, such as bytes that are no character alone, show once, with
  the likelier value), ``text_offset`` counting characters of the token texts from the first token.

A token's text is the rank's decoding of it alone; ``bytes`` are that text's UTF-8 (as in
vLLM). ``-inf`` is sent as ``-9999.0`` (JSON has no infinity; vLLM's choice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dpinfer.outputs import TokenLogprobs

LOGPROB_FLOOR = -9999.0


def _entry(text: str, logprob: float) -> dict[str, object]:
    return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode())}


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], texts: Mapping[int, str], top: int
) -> dict[str, object]:
    """``choices[].logprobs`` of a chat response or chunk."""
    content: list[dict[str, object]] = []
    for token, entry in zip(token_ids, logprobs, strict=True):
        item = _entry(texts.get(token, ""), entry[token])
        # The map holds the top K first (most likely first), then the token if not among them.
        item["top_logprobs"] = [_entry(texts.get(i, ""), v) for i, v in list(entry.items())[:top]]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], texts: Mapping[int, str], offset: int = 0
) -> tuple[dict[str, object], int]:
    """``choices[].logprobs`` of a completion (or chunk whose first token is at ``offset``
    characters), and the offset after its last token."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    for token, entry in zip(token_ids, logprobs, strict=True):
        text = texts.get(token, "")
        tokens.append(text)
        token_logprobs.append(max(entry[token], LOGPROB_FLOOR))
        top: dict[str, float] = {}
        for i, v in entry.items():  # most likely first: two tokens of one text show the likelier
            top.setdefault(texts.get(i, ""), max(v, LOGPROB_FLOOR))
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    shape = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": text_offset}  # fmt: skip
    return shape, offset
