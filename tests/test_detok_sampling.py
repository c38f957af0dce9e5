"""The detokenizer's share of the sampling surface: ``include_stop_str_in_output``,
``min_tokens`` (no stop string in the first tokens' text), ``stop_reason`` and logprobs
(with each token's text) carried on the output bodies, and the SDK's result assembly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from conftest import ids_of

from dpinfer import protocol
from dpinfer.client.session import ClientSession
from dpinfer.outputs import GenerationResult, StreamDelta
from dpinfer.protocol import OutputBody, PositionLogprobs
from dpinfer.protocol.local import RequestMeta, SchedulerBatch, SchedulerOutput
from dpinfer.tokenizer.incremental_detok import RequestDetokenizer, StopStringBuffer
from dpinfer.tokenizer.output_builder import OutputBuilder


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_include_stop_str_keeps_the_stop_string_and_cuts_what_follows(tok, decode, chunk: int) -> None:
    ids = ids_of(tok, "naïve END tail")
    for include, expected in ((True, "naïve END"), (False, "naïve ")):
        det = RequestDetokenizer(decode, stop=["END"], include_stop=include)
        pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
        deltas = [det.step(p) for p in pieces[:-1]] + [det.finish(pieces[-1], matched_stop="END")]
        assert "".join(deltas) == det.text == expected


def test_include_stop_str_when_only_the_scheduler_saw_it() -> None:
    buf = StopStringBuffer(["#"], include_stop=True)
    assert buf.push("abc") == "abc"
    assert buf.finish("#") == ""
    late = StopStringBuffer(["XY"], include_stop=True)
    assert late.push("abX") == "ab"
    assert late.push("Yzz") == "XY"


def test_min_tokens_ignores_stop_strings_in_the_first_tokens(tok, decode) -> None:
    text = "END one END two"
    ids = ids_of(tok, text)
    for chunk in (1, len(ids)):
        det = RequestDetokenizer(decode, stop=["END"], min_tokens=5)
        pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
        deltas = [det.step(p) for p in pieces[:-1]] + [det.finish(pieces[-1], matched_stop="END")]
        assert "".join(deltas) == det.text == "END one ", chunk


def _entry(ids: Sequence[int], values: Sequence[float]) -> PositionLogprobs:
    return PositionLogprobs(tuple(ids), tuple(values))


def _out(rid: int, ids: Sequence[int], finished: bool = False, **kw: Any) -> SchedulerOutput:
    return SchedulerOutput(request_id=rid, new_token_ids=list(ids), finished=finished, prompt_len=3, **kw)


class _Session(ClientSession):
    def __init__(self) -> None:
        super().__init__("tcp://127.0.0.1:1", "test")
        self.deltas: list[StreamDelta] = []
        self.results: list[tuple[GenerationResult, StreamDelta | None]] = []

    def on_delta(self, delta: StreamDelta) -> None:
        self.deltas.append(delta)

    def on_result(self, result: GenerationResult, tail: StreamDelta | None) -> None:
        self.results.append((result, tail))


def test_logprobs_and_stop_reason_reach_the_sdk_result_and_deltas(tok, decode) -> None:
    ids = ids_of(tok, "abcd")
    lps = [_entry([t, 7], [-0.5 - i, -2.0]) for i, t in enumerate(ids)]
    prompt = [_entry([9], [-1.25]), _entry([10, 11], [-0.1, -3.0])]
    builder = OutputBuilder(decode)
    metas = (RequestMeta(7, stream=True),)
    bodies = builder.process(SchedulerBatch(metas, (_out(7, ids[:2], logprobs=lps[:2]),))).bodies
    final = _out(
        7, ids[2:], True, finish_reason="stop", stop_reason=3, logprobs=lps[2:], prompt_logprobs=prompt
    )
    bodies += builder.process(SchedulerBatch(outputs=(final,))).bodies
    partial, last = (OutputBody.from_bytes(b) for b in bodies)
    assert partial.logprobs == tuple(lps[:2]) and partial.token_texts == {ids[0]: "a", ids[1]: "b", 7: "\x04"}
    assert last.logprobs == tuple(lps) and last.prompt_logprobs == tuple(prompt) and last.stop_reason == 3
    assert last.token_texts is not None and last.token_texts[ids[3]] == "d" and 10 in last.token_texts

    session = _Session()
    rid = session.add(stream=True, rank=None).client_request_id
    entries = (protocol.OutputEntry(rid, False, 0), protocol.OutputEntry(rid, True, 0))
    session.dispatch(protocol.encode(protocol.Outputs(entries, tuple(bodies))))
    (delta,), [(result, tail)] = session.deltas, session.results
    assert delta.logprobs == [e.as_dict() for e in lps[:2]] and delta.token_texts == partial.token_texts
    assert result.logprobs == [e.as_dict() for e in lps]
    assert result.prompt_logprobs == [None, {9: -1.25}, {10: -0.1, 11: -3.0}]
    assert result.stop_reason == 3 and result.token_texts == last.token_texts
    assert tail is not None and tail.token_ids == tuple(ids[2:]) and tail.logprobs == result.logprobs[2:]
