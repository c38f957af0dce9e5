"""Checks on a ``TokenizedRequest`` before it is queued: what makes it impossible to serve.

Every problem becomes a message for an ``error`` output, never an exception: the request
came from a user and must not stop the scheduler loop.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from dpinfer.errors import DpinferError
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner


def validate_request(
    req: TokenizedRequest,
    runner: ModelRunner,
    live_ids: Container[int],
    max_context_len: int,
    load_decoder: Callable[[], Any],
) -> str | None:
    """Why ``req`` can never be served (a message for the user), or ``None`` if it can.

    ``load_decoder`` is called when the request has stop strings (they need the tokenizer).
    """
    if req.request_id in live_ids:
        return f"request id {req.request_id} is already in use"
    if not req.input_ids:
        return "empty prompt: at least one input token is needed"
    vocab = runner.vocab_size
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in req.input_ids):
        return f"input token ids must be integers in [0, {vocab})"
    if len(req.input_ids) >= max_context_len:
        return (
            f"prompt of {len(req.input_ids)} tokens does not fit: prompt + output must stay "
            f"below {max_context_len} tokens (model context or KV pool size)"
        )
    if req.mm_inputs:
        if not runner.supports_images:
            return f"model {runner.spec.name} does not take images"
        error = runner.check_mm_inputs(req.input_ids, req.mm_inputs)
        if error is not None:
            return error
    if req.sampling.stop:
        try:
            load_decoder()
        except (OSError, ValueError, DpinferError) as e:
            return f"stop strings need the tokenizer, which failed to load: {e}"
    return None
