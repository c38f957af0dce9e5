"""Incremental detokenization: split characters, stop strings, deltas == final text, bounded work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from conftest import ids_of

from dpinfer.protocol import OutputBody
from dpinfer.protocol.local import RequestMeta, SchedulerBatch, SchedulerOutput
from dpinfer.tokenizer.incremental_detok import (
    MAX_HELD_TOKENS,
    IncrementalDecoder,
    RequestDetokenizer,
    StopStringBuffer,
)
from dpinfer.tokenizer.output_builder import OutputBuilder

TEXTS = ["héllo wörld", "price: 5€ 😀 done", "日本語のテキスト", "plain ascii"]


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_emits_partial_characters(tok, decode, text: str) -> None:
    dec = IncrementalDecoder(decode)
    pieces = [dec.add([t]) for t in ids_of(tok, text)]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # A 3-byte character arrives as 3 tokens: the first two steps release nothing.
    if "€" in text:
        assert "€" in pieces, f"'€' should be released whole, got {pieces}"


def test_replacement_char_decoders_hold_back_too() -> None:
    # Decoders that use errors="replace" (most byte-level BPEs) show U+FFFD for a partial char.
    def decode(ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    dec = IncrementalDecoder(decode)
    euro = list("€".encode())
    assert dec.add([ord("a")]) == "a"
    assert dec.add(euro[:1]) == ""
    assert dec.add(euro[1:2]) == ""
    assert dec.add(euro[2:]) == "€"


def test_window_is_bounded_when_bytes_never_complete(tok, decode) -> None:
    calls: list[int] = []

    def counting(ids: Sequence[int]) -> str:
        calls.append(len(ids))
        return decode(ids)

    dec = IncrementalDecoder(counting)
    for _ in range(200):
        dec.add([0x80 + 3])  # a lone continuation byte: never a valid character
    assert max(calls) <= 2 * (MAX_HELD_TOKENS + 2), f"decode window grew to {max(calls)} tokens"


def test_no_full_redecode_on_long_outputs(tok, decode) -> None:
    sizes: list[int] = []

    def counting(ids: Sequence[int]) -> str:
        sizes.append(len(ids))
        return decode(ids)

    det = RequestDetokenizer(counting)
    text = "abcdefgh€" * 100
    for t in ids_of(tok, text):
        det.step([t])
    assert det.finish() == ""
    assert det.text == text
    assert max(sizes) <= 8, f"decoded a window of {max(sizes)} tokens"


def test_stop_buffer_holds_back_possible_prefix() -> None:
    buf = StopStringBuffer(["STOP"])
    assert buf.push("hello S") == "hello "
    assert buf.push("T") == ""
    assert buf.push("x") == "STx"  # not a stop after all: released
    assert buf.push("ab ST") == "ab "
    assert buf.push("OP and more") == ""
    assert buf.found == "STOP"
    assert buf.finish() == ""


def test_stop_buffer_earliest_of_several_stops() -> None:
    buf = StopStringBuffer(["world", "lo w"])
    assert buf.push("hello world") == "hel"
    assert buf.finish("world") == ""


def test_stop_buffer_cut_at_finish_when_matched_by_scheduler() -> None:
    buf = StopStringBuffer([])
    assert buf.push("abc###def") == "abc###def"
    buf2 = StopStringBuffer(["#"])
    assert buf2.push("abc") == "abc"
    assert buf2.finish("#") == ""


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_deltas_concatenate_to_final_text_with_stop(tok, decode, chunk: int) -> None:
    text = "naïve café ☕ END tail"
    det = RequestDetokenizer(decode, stop=["END"])
    ids = ids_of(tok, text)
    chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    deltas = [det.step(c) for c in chunks[:-1]]
    deltas.append(det.finish(chunks[-1], matched_stop="END"))
    assert "".join(deltas) == det.text == "naïve café ☕ "


def test_prompt_context_gives_first_token_its_leading_space() -> None:
    # A SentencePiece-like decoder drops the leading space of the first token when decoded alone.
    vocab = {1: "▁Hello", 2: "▁world", 3: "!"}

    def decode(ids: Sequence[int]) -> str:
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    det = RequestDetokenizer(decode, context_ids=[1])
    assert det.step([2]) == " world"
    assert det.finish([3]) == "!"
    assert det.text == " world!"
    assert det.token_ids == [2, 3]


def _out(rid: int, ids: Sequence[int], finished: bool = False, **kw: Any) -> SchedulerOutput:
    base: dict[str, Any] = dict(finish_reason=None, matched_stop=None, error=None, prompt_len=4, cached_len=1)
    base.update(kw)
    return SchedulerOutput(request_id=rid, new_token_ids=list(ids), finished=finished, **base)


def test_output_builder_streams_deltas_and_one_final(tok, decode) -> None:
    builder = OutputBuilder(decode)
    text = "ab€c STOP zz"
    ids = ids_of(tok, text)
    metas = (RequestMeta(7, stream=True, stop=("STOP",)), RequestMeta(8, stream=False))
    out = builder.process(SchedulerBatch(metas=metas, outputs=(_out(7, ids[:3]), _out(8, ids[:3]))))
    assert [e.request_id for e in out.entries] == [7], "only the streaming request gets a partial"
    first = OutputBody.from_bytes(out.bodies[0])
    assert first.delta_text == "ab" and first.delta_token_ids == tuple(ids[:3])
    deltas = [first.delta_text]
    for i in range(3, len(ids) - 1):
        out = builder.process(SchedulerBatch(outputs=(_out(7, ids[i : i + 1]),)))
        deltas += [OutputBody.from_bytes(b).delta_text for b in out.bodies]
        assert all(not e.final for e in out.entries)
    fin = builder.process(
        SchedulerBatch(
            outputs=(
                _out(7, ids[-1:], True, finish_reason="stop", matched_stop="STOP"),
                _out(8, [], True, finish_reason="length"),
            )
        )
    )
    assert [(e.request_id, e.final) for e in fin.entries] == [(7, True), (8, True)]
    body = OutputBody.from_bytes(fin.bodies[0])
    assert body.text == "ab€c " == "".join(deltas) + body.delta_text
    assert body.token_ids == tuple(ids) and body.completion_tokens == len(ids)
    assert fin.entries[0].num_tokens == len(ids)
    assert (body.prompt_tokens, body.cached_tokens, body.finish_reason) == (4, 1, "stop")
    other = OutputBody.from_bytes(fin.bodies[1])
    assert other.text == "ab" and other.delta_text == "" and other.finish_reason == "length"
    assert builder.num_tracked == 0, "finished requests must be forgotten"


def test_output_builder_error_final_without_tokens(decode) -> None:
    builder = OutputBuilder(decode)
    out = builder.process(
        SchedulerBatch(
            metas=(RequestMeta(1, stream=True),),
            outputs=(_out(1, [], True, finish_reason="error", error="boom"),),
        )
    )
    body = OutputBody.from_bytes(out.bodies[0])
    assert out.entries[0].final and body.error == "boom" and body.finish_reason == "error" and body.text == ""
