"""Turn scheduler token outputs into wire-ready ``OutputBody`` frames (pure logic, no I/O).

``OutputBuilder.process(batch)`` is the whole job of the DetokenizerProcess: per request it
keeps a ``RequestDetokenizer``; a streaming request gets a partial entry whenever new text
is released (``delta_text`` + the token ids since the last partial), every request gets
exactly one final entry with the whole text and token ids (a streaming one also carries
the last unsent delta). ``EngineOutputEntry.num_tokens`` is the tokens generated so far.

Logprobs ride along with their tokens (a partial carries those of its ``delta_token_ids``,
the final all of them, and the prompt's), with ``token_texts``: every id they name, decoded
alone (once per id and process: the texts are kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpinfer.log import get_logger
from dpinfer.protocol import EngineOutputEntry, FinishReason, OutputBody
from dpinfer.protocol.bodies import ErrorCode, PositionLogprobs
from dpinfer.protocol.local import RankOutputs, RequestMeta, SchedulerBatch, SchedulerOutput
from dpinfer.tokenizer.incremental_detok import DecodeFn, RequestDetokenizer

logger = get_logger(__name__)


@dataclass
class _Tracked:
    meta: RequestMeta
    detok: RequestDetokenizer
    num_sent_tokens: int = 0
    """Tokens already carried by partial outputs (the next delta starts here)."""
    unsent_text: str = ""
    """Text released but not yet sent: after replaying a continuation's tokens, what the
    client had not received of them (normally nothing); it leads the next delta."""
    logprobs: list[PositionLogprobs] | None = None
    """One per token so far, when the request asked for logprobs."""


class OutputBuilder:
    """Per-request incremental detokenization state for one rank."""

    def __init__(self, decode: DecodeFn) -> None:
        self._decode = decode
        self._requests: dict[int, _Tracked] = {}
        self._token_texts: dict[int, str] = {}

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def process(self, batch: SchedulerBatch) -> RankOutputs:
        """Consume one scheduler batch; return the outputs to forward (in batch order)."""
        for meta in batch.metas:
            self._requests[meta.request_id] = self._track(meta)
        entries: list[EngineOutputEntry] = []
        bodies: list[bytes] = []
        for out in batch.outputs:
            built = self._one(out)
            if built is not None:
                entries.append(built[0])
                bodies.append(built[1])
        return RankOutputs(
            tuple(entries), tuple(bodies), batch.control_acks, batch.load, batch.metrics, batch.cache_events
        )

    def _track(self, meta: RequestMeta) -> _Tracked:
        detok = RequestDetokenizer(
            self._decode, meta.stop, meta.prompt_tail, meta.min_tokens, meta.include_stop_str
        )
        tracked = _Tracked(meta, detok)
        if meta.resume_ids:
            # A continuation: replay what was generated before it moved, so the text goes on
            # exactly where the client's left off (same decoding context, same hold-backs).
            tracked.detok.step(meta.resume_ids)
            tracked.num_sent_tokens = len(meta.resume_ids)
            released = tracked.detok.text
            if len(released) < meta.resume_chars:
                logger.warning(
                    "request %d: the client has %d characters of its resumed output, the replay "
                    "releases %d", meta.request_id, meta.resume_chars, len(released),
                )  # fmt: skip
            tracked.unsent_text = released[meta.resume_chars :]
        return tracked

    def _one(self, out: Any) -> tuple[EngineOutputEntry, bytes] | None:
        rid = out.request_id
        tracked = self._requests.get(rid)
        if tracked is None:
            # Outputs are preceded by their meta on the same ordered path; a missing one
            # is a bug upstream, but the request must still get its reply.
            logger.warning("output for unknown request %d; treating it as non-streaming", rid)
            tracked = _Tracked(RequestMeta(rid, stream=False), RequestDetokenizer(self._decode))
            self._requests[rid] = tracked
        new_ids = tuple(out.new_token_ids or ())
        if out.logprobs is not None:
            if tracked.logprobs is None:
                tracked.logprobs = []
            tracked.logprobs.extend(out.logprobs)
        if out.finished:
            del self._requests[rid]
            return self._final(tracked, out, new_ids)
        delta = tracked.detok.step(new_ids)
        if tracked.unsent_text:
            delta, tracked.unsent_text = tracked.unsent_text + delta, ""
        if not (tracked.meta.stream and delta):
            return None
        ids = tracked.detok.token_ids
        start = tracked.num_sent_tokens
        # A continuation's logprobs start at its first new token (the resumed ones were streamed).
        first = start - len(tracked.meta.resume_ids)
        logprobs = None if tracked.logprobs is None else tuple(tracked.logprobs[first:])
        body = OutputBody(
            delta_text=delta,
            delta_token_ids=tuple(ids[start:]),
            logprobs=logprobs,
            token_texts=self._texts(*logprobs) if logprobs else None,
        )
        tracked.num_sent_tokens = len(ids)
        return EngineOutputEntry(rid, False, len(ids)), body.to_bytes()

    def _final(
        self, tracked: _Tracked, out: Any, new_ids: tuple[int, ...]
    ) -> tuple[EngineOutputEntry, bytes]:
        matched = out.matched_stop if isinstance(out.matched_stop, str) else None
        delta = tracked.unsent_text + tracked.detok.finish(new_ids, matched)
        ids = tuple(tracked.detok.token_ids)
        stream = tracked.meta.stream
        logprobs = None if tracked.logprobs is None else tuple(tracked.logprobs)
        prompt = None if out.prompt_logprobs is None else tuple(out.prompt_logprobs)
        body = OutputBody(
            text=tracked.detok.text,
            token_ids=ids,
            delta_text=delta if stream else "",
            delta_token_ids=ids[tracked.num_sent_tokens :] if stream else (),
            finish_reason=str(out.finish_reason or FinishReason.STOP.value),
            error=out.error or None,
            error_code=_error_code(out),
            prompt_tokens=int(out.prompt_len or 0),
            completion_tokens=len(ids),
            cached_tokens=int(out.cached_len or 0),
            stop_reason=out.stop_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt,
            token_texts=self._texts(*(logprobs or ()), *(prompt or ())) if logprobs or prompt else None,
        )
        return EngineOutputEntry(tracked.meta.request_id, True, len(ids)), body.to_bytes()

    def _texts(self, *entries: PositionLogprobs) -> dict[int, str]:
        """The text of every token id ``entries`` name, each decoded alone."""
        known = self._token_texts
        texts: dict[int, str] = {}
        for entry in entries:
            for token_id in entry.ids:
                text = known.get(token_id)
                if text is None:
                    text = known[token_id] = self._decode([token_id])
                texts[token_id] = text
        return texts

    def drop(self, request_id: int) -> None:
        self._requests.pop(request_id, None)


def _error_code(out: SchedulerOutput) -> str | None:
    if out.finish_reason == FinishReason.ERROR.value:
        return out.error_code or ErrorCode.INTERNAL.value
    if out.finish_reason == FinishReason.ABORT.value:
        return ErrorCode.ABORTED.value
    return None
