"""Checks on a ``TokenizedRequest`` before it is queued: what this scheduler cannot serve.

The request body was checked by the TokenizerProcess (``protocol.bodies.RequestBody``, then
``tokenizer.request_parsing`` for the model's vocabulary and prompt limit), so a non-empty
prompt of in-vocabulary ids is an internal invariant here (``assert``). What only the
scheduler knows -- its live request ids, its context and KV pool size, the runner's image
contract, whether the stop-string decoder loads -- becomes a message for an ``error``
output, never an exception: the request must not stop the scheduler loop.
"""

from __future__ import annotations

from collections.abc import Callable, Container

from dpinfer.errors import DpinferError
from dpinfer.protocol.local import TokenizedRequest
from dpinfer.runner.model_runner import ModelRunner


def validate_request(
    req: TokenizedRequest,
    runner: ModelRunner,
    live_ids: Container[int],
    max_context_len: int,
    load_decoder: Callable[[], object],
) -> str | None:
    """Why ``req`` can never be served (a message for the user), or ``None`` if it can.

    ``load_decoder`` is called when the request has stop strings (they need the tokenizer).
    """
    assert req.input_ids, "the tokenizer never sends an empty prompt"
    assert all(0 <= t < runner.vocab_size for t in req.input_ids), "the tokenizer checks token ids"
    if req.request_id in live_ids:
        return f"request id {req.request_id} is already in use"
    if req.resume_ids:
        assert all(0 <= t < runner.vocab_size for t in req.resume_ids), "the tokenizer checks them"
        if len(req.resume_ids) >= req.sampling.max_new_tokens:
            return (
                f"the continuation already has {len(req.resume_ids)} output tokens; "
                f"max_new_tokens is {req.sampling.max_new_tokens}"
            )
    if len(req.input_ids) + len(req.resume_ids) >= max_context_len:
        return (
            f"prompt of {len(req.input_ids)} tokens does not fit: prompt + output must stay "
            f"below {max_context_len} tokens (model context or KV pool size)"
        )
    if req.mm_inputs:
        error = runner.check_mm_inputs(req.input_ids, req.mm_inputs)
        if error is not None:
            return error
    if req.sampling.stop:
        try:
            load_decoder()
        except (OSError, ValueError, DpinferError) as e:
            return f"stop strings need the tokenizer, which failed to load: {e}"
    return None
