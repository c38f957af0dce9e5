"""A table-driven decode for byte-level tokenizers whose own ``decode`` is slow Python.

``ByT5Tokenizer`` (the built-in tiny models' tokenizer) maps every id to one byte or to a
special token and decodes in pure Python (~65 µs per call); the detokenizer decodes twice per
generated token. ``byte_table_decode`` builds, once, each id's bytes exactly as the tokenizer's
``decode(..., skip_special_tokens=True)`` would produce them (specials give no bytes), and
then decodes with one ``bytes.join`` (~1 µs). Ids outside the table fall back to the
tokenizer. Tokenizers backed by the Rust ``tokenizers`` library are fast already and keep
their own ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

DecodeFn = Callable[[Sequence[int]], str]


def _slow_decode(tokenizer: Any) -> DecodeFn:
    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


def byte_table_decode(tokenizer: Any) -> DecodeFn | None:
    """An exact fast decode for ByT5-style byte tokenizers, or ``None`` for any other kind."""
    if type(tokenizer).__name__ != "ByT5Tokenizer":
        return None
    table: list[bytes] = []
    for token_id in range(len(tokenizer)):
        tokens = tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=True)
        piece = b""
        for token in tokens:
            if token in tokenizer.added_tokens_encoder:
                piece += token.encode("utf-8")
            else:
                piece += bytes([ord(token)])
        table.append(piece)
    slow = _slow_decode(tokenizer)
    size = len(table)

    def decode(ids: Sequence[int]) -> str:
        try:
            return b"".join([table[i] for i in ids]).decode("utf-8", errors="ignore")
        except (IndexError, TypeError):
            return slow(ids)  # out-of-table or odd ids: the tokenizer says what they mean

    decode.table_size = size  # type: ignore[attr-defined]
    return decode


def make_decode(tokenizer: Any) -> DecodeFn:
    """The one decode call used for every piece of output text."""
    return byte_table_decode(tokenizer) or _slow_decode(tokenizer)
