"""Output bodies as the SDK hands them back: ``GenerationResult`` and ``StreamDelta`` (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from dpinfer import protocol as p
from dpinfer.outputs import GenerationResult, Routing, StreamDelta


def result_of(
    request_id: int, rank: int, body: p.OutputBody, latency_s: float, routing: Routing | None = None,
    index: int = 0, streamed: Sequence[p.PositionLogprobs] = (),
) -> GenerationResult:  # fmt: skip
    """The result of a final ``body``. ``streamed``: the logprobs the stream's deltas carried,
    which give those of the tokens a continuation did not generate itself (a final output of a
    moved request holds every token id, but the logprobs of the tokens made after the move)."""
    logprobs = body.logprobs
    if logprobs is not None and len(logprobs) < len(body.token_ids) <= len(logprobs) + len(streamed):
        logprobs = (*streamed[: len(body.token_ids) - len(logprobs)], *logprobs)
    return GenerationResult(
        request_id=request_id,
        text=body.text,
        token_ids=body.token_ids,
        finish_reason=body.finish_reason or p.FinishReason.ERROR.value,
        error=body.error if body.finish_reason else (body.error or "final output without a finish reason"),
        error_code=body.error_code if body.finish_reason else (body.error_code or p.ErrorCode.INTERNAL.value),
        rank=rank,
        prompt_tokens=body.prompt_tokens,
        completion_tokens=body.completion_tokens,
        cached_tokens=body.cached_tokens,
        latency_s=latency_s,
        stop_reason=body.stop_reason,
        logprobs=None if logprobs is None else [e.as_dict() for e in logprobs],
        prompt_logprobs=None
        if body.prompt_logprobs is None
        else [None, *(e.as_dict() for e in body.prompt_logprobs)],
        token_texts=body.token_texts,
        routing=routing,
        index=index,
    )


def delta_of(
    request_id: int, body: p.OutputBody, routing: Routing | None = None, index: int = 0
) -> StreamDelta:
    logprobs = None if body.logprobs is None else [e.as_dict() for e in body.logprobs]
    return StreamDelta(
        request_id, body.delta_text, body.delta_token_ids, logprobs=logprobs, token_texts=body.token_texts,
        routing=routing, index=index,
    )  # fmt: skip


def tail_of(result: GenerationResult, body: p.OutputBody | None) -> StreamDelta:
    text = body.delta_text if body else ""
    token_ids = body.delta_token_ids if body else ()
    logprobs = None
    if result.logprobs is not None:  # the final body's logprobs are the whole result's: the tail's end them
        logprobs = result.logprobs[len(result.token_ids) - len(token_ids) :]
    return StreamDelta(
        result.request_id, text, token_ids, finished=True, result=result,
        logprobs=logprobs, token_texts=result.token_texts, index=result.index,
    )  # fmt: skip


def routing_of(entry: p.OutputEntry, policy: str) -> Routing | None:
    """Where an output's request went and why: the hub's ``RouteInfo``, else the hello's
    ``policy``; ``None`` when no rank served it."""
    if entry.rank == p.NO_RANK:
        return None
    if entry.routing is not None:
        info = entry.routing
        return Routing(info.policy, entry.rank, info.matched_chars, info.reason)
    return Routing(policy, entry.rank, 0, policy)
