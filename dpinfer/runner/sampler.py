"""Batched sampling: greedy, temperature, top-k, top-p, with a generator per request.

``SamplingInfo`` holds one batch's parameters as tensors; it is rebuilt only when the batch's
membership changes, never per step. ``sample`` is vectorised: an all-greedy batch is one
``argmax``; otherwise the sampled rows share one sort/softmax/cumsum, and each row draws its
uniform number from its own ``torch.Generator``, so a seeded request samples the same
tokens whatever else is in the batch. Penalties and ``min_tokens`` (``penalties.py``) come
first, on a copy of the logits, only when a request of the batch uses them; ``logprobs``
reads the raw logits, only for the rows that ask.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from dpinfer.protocol.bodies import PositionLogprobs
from dpinfer.runner.logprobs import position_logprobs
from dpinfer.runner.penalties import Penalties
from dpinfer.sampling import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with fresh OS entropy when ``seed`` is None."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


@dataclass
class SamplingInfo:
    """Sampling parameters of a batch, row-aligned with its logits."""

    all_greedy: bool
    sampled_rows: torch.Tensor
    """Indices of the rows that sample (not greedy)."""
    temperatures: torch.Tensor
    """``[S, 1]`` for the sampled rows."""
    top_ks: torch.Tensor
    """``[S]``; the vocabulary size where top-k is off."""
    top_ps: torch.Tensor
    """``[S]``."""
    need_top_k: bool
    need_top_p: bool
    generators: list[torch.Generator]
    """One per sampled row."""
    penalties: Penalties | None = None
    """The rows that use a penalty or ``min_tokens`` (``None``: no row does)."""
    logprob_rows: list[int] | None = None
    """Rows that want logprobs (``None``: no row does)."""
    logprob_ks: tuple[int, ...] = ()
    """Per row of ``logprob_rows``: how many most likely tokens it wants."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        prompt_ids: Sequence[Sequence[int]] | None = None,
        output_ids: Sequence[Sequence[int]] | None = None,
        stop_ids: Sequence[Collection[int]] | None = None,
    ) -> SamplingInfo:
        """``prompt_ids``, ``output_ids`` and ``stop_ids`` (each request's stop token ids) are
        read only when a request uses a penalty or ``min_tokens``."""
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        sampled = [params[i] for i in rows]
        gens = [generators[i] for i in rows]
        assert all(g is not None for g in gens), "every sampled request needs a generator"
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in sampled]
        return cls(
            all_greedy=not rows,
            sampled_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            temperatures=torch.tensor([[p.temperature] for p in sampled], dtype=torch.float32, device=device),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_ps=torch.tensor([p.top_p for p in sampled], dtype=torch.float32, device=device),
            need_top_k=any(k < vocab_size for k in top_ks),
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            generators=gens,  # type: ignore[arg-type]
            penalties=Penalties.build(params, prompt_ids, output_ids, stop_ids, vocab_size, device),
            logprob_rows=lp_rows or None,
            logprob_ks=tuple(params[i].logprobs or 0 for i in lp_rows),
        )


def _sample_rows(logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
    """Sample one token per row of ``logits [S, V]`` (all rows non-greedy)."""
    scaled = logits.float() / info.temperatures
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    vocab = sorted_logits.shape[-1]
    if info.need_top_k:
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= info.top_ks.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    if info.need_top_p:
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= info.top_ps.unsqueeze(1), 0.0)
    cdf = probs.cumsum(dim=-1)
    uniform = torch.stack([torch.rand((), generator=g) for g in info.generators]).to(logits.device)
    threshold = (uniform * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, threshold, right=True).clamp_(max=vocab - 1)
    return sorted_ids.gather(1, choice).squeeze(1)


def sample(logits: torch.Tensor, info: SamplingInfo) -> torch.Tensor:
    """Next token per row of ``logits [B, V]`` as an int64 tensor ``[B]``; ``logits`` is left
    as it was, the batch's penalty state counts the tokens sampled."""
    if info.penalties is not None:
        logits = info.penalties.apply(logits)
    next_ids = logits.argmax(dim=-1)
    if not info.all_greedy:
        rows = info.sampled_rows
        next_ids[rows] = _sample_rows(logits.index_select(0, rows), info)
    if info.penalties is not None:
        info.penalties.update(next_ids)
    return next_ids


def logprobs(
    logits: torch.Tensor, info: SamplingInfo, next_ids: torch.Tensor
) -> list[PositionLogprobs | None] | None:
    """Per row, the logprobs of ``next_ids`` and the most likely tokens from the raw ``logits``,
    for the rows that asked (``None`` for the others); ``None`` when no row asked."""
    rows = info.logprob_rows
    if rows is None:
        return None
    if len(rows) == len(next_ids):
        return list(position_logprobs(logits, next_ids, info.logprob_ks))
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    entries = position_logprobs(
        logits.index_select(0, index), next_ids.index_select(0, index), info.logprob_ks
    )
    out: list[PositionLogprobs | None] = [None] * len(next_ids)
    for row, entry in zip(rows, entries, strict=True):
        out[row] = entry
    return out
