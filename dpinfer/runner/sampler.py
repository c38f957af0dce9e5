"""Batched sampling: greedy, temperature, top-k, top-p, with a generator per request.

``SamplingInfo`` holds one batch's parameters as tensors; it is rebuilt only when the batch's
membership changes, never per step. ``sample`` is vectorised: an all-greedy batch is one
``argmax``; otherwise the sampled rows share one sort/softmax/cumsum, and each row draws its
uniform number from its own ``torch.Generator``, so a seeded request samples the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingInfo:
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
    """Next token per row of ``logits [B, V]`` as an int64 tensor ``[B]``."""
    next_ids = logits.argmax(dim=-1)
    if not info.all_greedy:
        rows = info.sampled_rows
        next_ids[rows] = _sample_rows(logits.index_select(0, rows), info)
    return next_ids
