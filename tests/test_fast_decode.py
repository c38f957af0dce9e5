"""The byte-table decode must equal the tokenizer's own decode on every input it may see."""

from __future__ import annotations

import random

import pytest

from dpinfer.config import ModelConfig
from dpinfer.runner.registry import load_tokenizer
from dpinfer.tokenizer.fast_decode import byte_table_decode, make_decode
from dpinfer.tokenizer.incremental_detok import RequestDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(model="tiny-llama"))


def slow(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_equals_tokenizer_decode_on_random_ids(tokenizer) -> None:
    fast = byte_table_decode(tokenizer)
    assert fast is not None
    rng = random.Random(0)
    vocab = len(tokenizer)
    text_ids = tokenizer("naïve café 東京 🌍 ok", add_special_tokens=False)["input_ids"]
    cases = [[], [0, 1, 2], [vocab - 1], text_ids, text_ids[:-1], text_ids[1:]]
    cases += [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(2000)]
    for ids in cases:
        assert fast(ids) == slow(tokenizer, ids), ids


def test_out_of_table_ids_fall_back_to_the_tokenizer(tokenizer) -> None:
    fast = make_decode(tokenizer)
    ids = [104, len(tokenizer) + 5]
    try:
        expected = slow(tokenizer, ids)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer does, the fast path does too
        with pytest.raises(type(e)):
            fast(ids)
    else:
        assert fast(ids) == expected


def test_streamed_pieces_of_split_characters_match_the_slow_path(tokenizer) -> None:
    ids = tokenizer("héllo wörld 東京🌍!", add_special_tokens=False)["input_ids"]
    pieces = {}
    for name, decode in (("fast", make_decode(tokenizer)), ("slow", lambda x: slow(tokenizer, x))):
        detok = RequestDetokenizer(decode)
        out = [detok.step([i]) for i in ids] + [detok.finish()]
        pieces[name] = out
    assert pieces["fast"] == pieces["slow"]
    assert "".join(pieces["fast"]) == "héllo wörld 東京🌍!"


def test_fast_tokenizers_keep_their_own_decode() -> None:
    class NotByT5:
        pass

    assert byte_table_decode(NotByT5()) is None
