"""Repetition, presence and frequency penalties and ``min_tokens``, vectorised over a batch.

``Penalties`` exists only when some request of the batch uses one (``SamplingParams.
has_penalties``), and covers only those rows ``R``. It keeps ``[R, V]`` tensors built once
from the requests' token lists when the batch's membership changes (one scatter), then
advanced by one scatter per step with the sampled tokens (``update``):

- ``repetition_penalty`` (``transformers``' ``RepetitionPenaltyLogitsProcessor``): over the
  prompt and the output, a positive logit is divided by the penalty, a negative one multiplied;
- ``frequency_penalty``/``presence_penalty`` (OpenAI's rule, over the output only):
  ``logit -= count * frequency + (count > 0) * presence``;
- ``min_tokens``: the request's stop token ids (EOS included unless ``ignore_eos``) get
  ``-inf`` while it has fewer than ``min_tokens`` output tokens.

Applied (as in vLLM) before temperature, top-k and top-p, on a copy: logprobs are taken from
the raw logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import torch

from dpinfer.sampling import SamplingParams


def _flat(lists: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token of ``lists``, as two int64 tensors."""
    lengths = torch.tensor([len(ids) for ids in lists], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.int64)
    return rows.to(device), ids.to(device)


class Penalties:
    """The penalty state of the rows ``rows`` of one batch; see the module docstring."""

    def __init__(
        self,
        rows: list[int],
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        stop_ids: Sequence[Collection[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        n = len(rows)
        self.rows = torch.tensor(rows, dtype=torch.int64, device=device)
        self._local = torch.arange(n, device=device)
        self.seen: torch.Tensor | None = None
        """``[R, V]`` bool: the token is in the prompt or the output (repetition penalty)."""
        self.counts: torch.Tensor | None = None
        """``[R, V]`` float: times the token was generated (presence/frequency penalties)."""
        if any(p.repetition_penalty != 1.0 for p in params):
            self.repetition = torch.tensor([[p.repetition_penalty] for p in params], device=device)
            self.seen = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            r, ids = _flat([[*a, *b] for a, b in zip(prompt_ids, output_ids, strict=True)], device)
            self.seen[r, ids] = True
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            self.presence = torch.tensor([[p.presence_penalty] for p in params], device=device)
            self.frequency = torch.tensor([[p.frequency_penalty] for p in params], device=device)
            self.counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            r, ids = _flat(output_ids, device)
            self.counts.index_put_((r, ids), torch.ones(len(ids), device=device), accumulate=True)
        self.min_rows: torch.Tensor | None = None
        """Local row of each (row, stop id) pair masked while its row is below ``min_tokens``."""
        if any(p.min_tokens > 0 for p in params):
            masked = [
                sorted(stop) if p.min_tokens > 0 else [] for p, stop in zip(params, stop_ids, strict=True)
            ]
            self.min_rows, self.min_ids = _flat(masked, device)
            self.min_tokens = torch.tensor([p.min_tokens for p in params], device=device)
            self.num_output = torch.tensor([len(ids) for ids in output_ids], device=device)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]] | None,
        output_ids: Sequence[Sequence[int]] | None,
        stop_ids: Sequence[Collection[int]] | None,
        vocab_size: int,
        device: torch.device,
    ) -> Penalties | None:
        """The state of the rows of ``params`` that use a penalty, or ``None`` if none does."""
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if not rows:
            return None
        assert prompt_ids is not None and output_ids is not None and stop_ids is not None, (
            "penalties need tokens"
        )
        return cls(
            rows,
            [params[i] for i in rows],
            [prompt_ids[i] for i in rows],
            [output_ids[i] for i in rows],
            [stop_ids[i] for i in rows],
            vocab_size,
            device,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits [B, V]`` with the penalties applied to the rows that use them."""
        sub = logits.index_select(0, self.rows)
        if self.seen is not None:
            penalised = torch.where(sub < 0, sub * self.repetition, sub / self.repetition)
            sub = torch.where(self.seen, penalised, sub)
        if self.counts is not None:
            sub = sub - self.counts * self.frequency - (self.counts > 0) * self.presence
        if self.min_rows is not None:
            below = (self.num_output < self.min_tokens)[self.min_rows]
            sub[self.min_rows[below], self.min_ids[below]] = float("-inf")
        return logits.index_copy(0, self.rows, sub)

    def update(self, next_ids: torch.Tensor) -> None:
        """Count the tokens just sampled (``next_ids [B]``) for the next step."""
        ids = next_ids.index_select(0, self.rows)
        if self.seen is not None:
            self.seen[self._local, ids] = True
        if self.counts is not None:
            self.counts[self._local, ids] += 1
        if self.min_rows is not None:
            self.num_output += 1
