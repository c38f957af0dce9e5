"""Routing keys -> prompt token counts: when a rank's prefix cache holds each key.

Key ``j`` of ``protocol.prefix_keys`` covers the first ``(j + 1) * BLOCK`` units of the
request's canonical content. The rank computes the keys itself from the body it decoded
(never trusting the client's) and maps each to ``num_tokens``: the prompt tokens whose KV
must be in the radix tree for the key's content to be cached. The rule is conservative:
``num_tokens`` is the count of tokens up to and including the one that covers the block's
last character (a token straddling the block end is required whole).

- token-id prompts: ``(j + 1) * BLOCK_TOKENS`` (the blocks are the ids themselves);
- text prompts: character offsets of the tokens, from the fast tokenizer's offset mapping,
  or for a byte tokenizer (ByT5) by counting the UTF-8 characters each token starts;
- chat: the canonical content is ``role, content`` per message; the rank renders the chat
  template to text, finds each message's content in it (in order), maps canonical offsets to
  rendered ones (an offset inside a role header maps to the start of that message's
  content), then to tokens as for text. A content the template changed (not found verbatim)
  ends the mapping there: later keys get no position and are never reported;
- anything else (images, a tokenizer of neither kind, ids that do not match the rendered
  text): every key needs the whole prompt, so it is reported only once the whole prompt is
  cached (an image's keys are seeded with its hash; see ``prefix_keys``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from dpinfer.protocol import prefix_keys
from dpinfer.protocol.bodies import ChatMessage, RequestBody

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CacheKeys = tuple[tuple[int, int], ...]


class PositionMapper:
    """Maps one tokenizer's token ids to character offsets (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self.char_starts: list[int] | None = None if self.fast else _byte_char_starts(tokenizer)
        """Per token id: characters whose first byte it holds (byte tokenizers only)."""

    def cache_keys(self, body: RequestBody, input_ids: Sequence[int]) -> CacheKeys:
        keys = prefix_keys.body_keys(body)
        if not keys:
            return ()
        n = len(input_ids)
        if body.images:
            return tuple((k, n) for k in keys)
        if body.messages is not None:
            ends = self._chat_ends(body.messages, input_ids, len(keys))
        elif isinstance(body.prompt, str):
            ends = self._text_ends(body.prompt, input_ids, len(keys))
        else:
            ends = [(j + 1) * prefix_keys.BLOCK_TOKENS for j in range(len(keys))]
        if ends is None:
            return tuple((k, n) for k in keys)
        return tuple((k, min(e, n)) for k, e in zip(keys, ends, strict=False))

    # ------------------------------------------------------------------ pieces

    def _token_char_ends(self, text: str, input_ids: Sequence[int], specials: bool) -> list[int] | None:
        """For each token, the character offset in ``text`` where it ends (non-decreasing)."""
        if self.char_starts is not None:
            table = self.char_starts
            ends, pos = [], 0
            for t in input_ids:
                pos += table[t] if 0 <= t < len(table) else 0
                ends.append(pos)
            return ends if pos == len(text) else None
        if not self.fast:
            return None
        enc = self.tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(input_ids):
            return None
        ends, last = [], 0
        for _start, end in enc["offset_mapping"]:
            last = max(last, end)
            ends.append(last)
        return ends

    def _text_ends(self, text: str, input_ids: Sequence[int], num_keys: int) -> list[int] | None:
        ends = self._token_char_ends(text, input_ids, self.add_special_tokens)
        if ends is None:
            return None
        return [_tokens_covering(ends, (j + 1) * prefix_keys.BLOCK_CHARS) for j in range(num_keys)]

    def _chat_ends(
        self, messages: Sequence[ChatMessage], input_ids: Sequence[int], num_keys: int
    ) -> list[int] | None:
        try:
            rendered = self.tokenizer.apply_chat_template(
                msgspec.to_builtins(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception:  # noqa: BLE001 - the real tokenization already succeeded
            return None
        if not isinstance(rendered, str):
            return None
        ends = self._token_char_ends(rendered, input_ids, False)
        if ends is None:
            return None
        # Canonical segment of message i: [seg_start, content_start) header, then content.
        out: list[int] = []
        canon, cursor = 0, 0
        block = prefix_keys.BLOCK_CHARS
        for m in messages:
            content = prefix_keys.content_text(m.content)
            found = rendered.find(content, cursor)
            if found < 0:
                return out  # later keys get no position: never reported
            content_start = canon + len(m.role) + 1
            seg_end = content_start + len(content) + 1
            while len(out) < num_keys and (len(out) + 1) * block <= seg_end:
                c = (len(out) + 1) * block
                out.append(_tokens_covering(ends, found + max(0, min(c - content_start, len(content)))))
            cursor, canon = found + len(content), seg_end
        return out


def _tokens_covering(ends: list[int], chars: int) -> int:
    """Fewest leading tokens whose text reaches character ``chars`` (all if none does)."""
    return min(bisect.bisect_left(ends, chars) + 1, len(ends))


def _byte_char_starts(tokenizer: Any) -> list[int] | None:
    """Per id, the UTF-8 lead bytes of its piece, for ByT5-style byte tokenizers (else None)."""
    if type(tokenizer).__name__ != "ByT5Tokenizer":
        return None
    table: list[int] = []
    for token_id in range(len(tokenizer)):
        tokens = tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=True)
        count = 0
        for token in tokens:
            if token in tokenizer.added_tokens_encoder:
                count += len(token)
            elif (ord(token) & 0xC0) != 0x80:
                count += 1
        table.append(count)
    return table
