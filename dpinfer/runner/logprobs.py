"""Token logprobs: the log-softmax of the model's raw logits, the top K and the row's own token.

Computed only for the rows of requests that ask (``SamplingParams.logprobs`` for generated
tokens, ``prompt_logprobs`` for prompt tokens), on the logits before any sampling transform,
in float32: one ``log_softmax``, one ``topk`` and one ``gather`` over those rows, then a short
Python loop over K <= ``MAX_LOGPROBS`` entries per row (never over the vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpinfer.protocol.bodies import PositionLogprobs


def position_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]
) -> list[PositionLogprobs]:
    """Per row of ``logits [N, V]``: its ``ks[row]`` most likely tokens (most likely first),
    then ``token_ids[row]`` if it is not among them, each with its logprob."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens: list[int] = token_ids.tolist()
    chosen: list[float] = logprobs.gather(1, token_ids.view(-1, 1).to(logits.device)).squeeze(1).tolist()
    k_max = max(ks, default=0)
    top_ids: list[list[int]] = [[] for _ in tokens]
    top_values: list[list[float]] = [[] for _ in tokens]
    if k_max > 0:
        values, ids = logprobs.topk(k_max, dim=-1)
        top_ids, top_values = ids.tolist(), values.tolist()
    out: list[PositionLogprobs] = []
    for row, (k, token) in enumerate(zip(ks, tokens, strict=True)):
        row_ids, row_values = top_ids[row][:k], top_values[row][:k]
        if token not in row_ids:
            row_ids.append(token)
            row_values.append(chosen[row])
        out.append(PositionLogprobs(tuple(row_ids), tuple(row_values)))
    return out
