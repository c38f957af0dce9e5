"""``ScheduleBatch``: the requests of one forward pass and the tensors describing them.

Two shapes, named as in SGLang:

- an *extend* batch (``prepare_for_extend``): admitted requests, each computing
  ``req.extend_len`` new tokens after ``req.kv_len`` tokens already in the pool; built
  fresh for every prefill step;
- the *running* (decode) batch (``prepare_for_decode``): one new token per request. Its
  per-request state lives in tensors (table rows, KV lengths, next input token, sampling
  parameters) that are updated in place each step and only re-indexed when membership
  changes (``filter``/``merge``), because rebuilding them from Python lists every step costs
  as much as the model itself on small models. (On CPU the C decode kernel reads those
  tensors and the request->slot table directly; without it the attention gets one slot view
  per request each step, B cheap slices, which measured faster than one padded call.)
"""

from __future__ import annotations

import torch

from dpinfer.runner.attention import (
    DecodeLayout,
    ExtendSeq,
    ForwardBatch,
    ForwardMode,
    bottom_right_causal_mask,
)
from dpinfer.runner.logprobs import position_logprobs
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.runner.sampler import SamplingInfo
from dpinfer.scheduler.req import Req


def build_sampling_info(reqs: list[Req], runner: ModelRunner) -> SamplingInfo:
    return SamplingInfo.build(
        [r.sampling for r in reqs],
        [r.generator for r in reqs],
        runner.vocab_size,
        runner.device,
        prompt_ids=[r.origin_input_ids for r in reqs],
        output_ids=[r.output_ids for r in reqs],
        stop_ids=[r.stop.stop_token_ids for r in reqs],
    )


class ScheduleBatch:
    """A list of requests plus the tensors a forward pass over them needs."""

    def __init__(self, reqs: list[Req], runner: ModelRunner) -> None:
        self.reqs = reqs
        self.runner = runner
        self.device = runner.device
        self.sampling: SamplingInfo | None = None
        self.prompt_logprob_rows: list[int] = []
        """Extend only: flat rows whose logits give prompt logprobs (after the sampling rows)."""
        self._prompt_spans: list[tuple[Req, int, int]] = []
        # Decode state; set by ``start_decoding``.
        self.req_pool_indices = torch.empty(0, dtype=torch.int64, device=self.device)
        self.seq_lens = torch.empty(0, dtype=torch.int64, device=self.device)
        self.input_ids = torch.empty(0, dtype=torch.int64, device=self.device)

    def __len__(self) -> int:
        return len(self.reqs)

    # ------------------------------------------------------------------ extend

    def prepare_for_extend(self) -> ForwardBatch:
        """The forward pass of an extend batch; logits are kept for requests whose prefill
        completes in this step (``sampling_reqs``), in order, then the rows that give prompt
        logprobs (``prompt_logprob_rows``; ``take_prompt_logprobs`` splits them off)."""
        table = self.runner.req_to_token_pool.req_to_token
        ids: list[int] = []
        positions, locs, seqs, keep = [], [], [], []
        self.sampling_reqs: list[Req] = []
        self.prompt_logprob_rows = []
        self._prompt_spans = []
        for req in self.reqs:
            start, n = req.kv_len, req.extend_len
            if req.needs_prompt_logprobs:
                self._add_prompt_logprob_rows(req, len(ids))
            assert req.req_pool_idx is not None and n > 0
            row = table[req.req_pool_idx]
            seq = ExtendSeq(q_start=len(ids), q_len=n, prefix_len=start)
            if start > 0:
                seq.kv_indices = row[: start + n]
                seq.mask = bottom_right_causal_mask(n, start, self.device)
            seqs.append(seq)
            ids.extend(req.fill_ids[start : start + n])
            positions.append(torch.arange(start, start + n, device=self.device))
            locs.append(row[start : start + n])
            if start + n >= req.fill_len:
                keep.append(len(ids) - 1)
                self.sampling_reqs.append(req)
        if self.sampling_reqs:
            self.sampling = build_sampling_info(self.sampling_reqs, self.runner)
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            kv_pool=self.runner.kv_pool,
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.cat(positions),
            out_cache_loc=torch.cat(locs),
            logits_indices=torch.tensor(
                keep + self.prompt_logprob_rows, dtype=torch.int64, device=self.device
            ),
            extend_seqs=seqs,
        )
        if any(r.image_positions is not None for r in self.reqs):
            self._add_image_embeds(batch)
        return batch

    def _add_prompt_logprob_rows(self, req: Req, q_start: int) -> None:
        """Keep the logits of the chunk's prompt positions whose next prompt token lacks its
        logprobs (row ``p`` gives token ``p + 1``); kept after the sampling rows."""
        assert req.prompt_logprobs is not None
        start, end = (
            max(req.kv_len, len(req.prompt_logprobs)),
            min(req.kv_len + req.extend_len, req.prompt_len - 1),
        )
        if start < end:
            first = q_start + start - req.kv_len
            self.prompt_logprob_rows.extend(range(first, first + end - start))
            self._prompt_spans.append((req, start, end))

    def take_prompt_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Hand the prompt-logprob rows of an extend step's ``logits`` to their requests;
        return the sampling rows."""
        if not self.prompt_logprob_rows:
            return logits
        num_sampling = len(logits) - len(self.prompt_logprob_rows)
        targets, ks = [], []
        for req, start, end in self._prompt_spans:
            targets.extend(req.origin_input_ids[start + 1 : end + 1])
            ks.extend([req.sampling.prompt_logprobs or 0] * (end - start))
        with torch.inference_mode():
            ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
            entries = position_logprobs(logits[num_sampling:], ids, ks)
        at = 0
        for req, start, end in self._prompt_spans:
            assert req.prompt_logprobs is not None and len(req.prompt_logprobs) == start
            req.prompt_logprobs.extend(entries[at : at + end - start])
            at += end - start
        return logits[:num_sampling]

    def _add_image_embeds(self, batch: ForwardBatch) -> None:
        """Image features for the image tokens this step computes (``image_positions/embeds``).

        A request's features are computed once (for every request that needs them, in one
        vision call) and sliced per chunk; tokens already in the pool (cached prefix, earlier
        chunks) are skipped, and the features are dropped after the last image token.
        """
        spans: list[tuple[Req, torch.Tensor, torch.Tensor, bool]] = []
        for req, seq in zip(self.reqs, batch.extend_seqs, strict=True):
            pos = req.image_positions
            if pos is None or not len(pos):
                continue
            start = seq.prefix_len
            rows = torch.nonzero((pos >= start) & (pos < start + seq.q_len)).flatten()
            if len(rows):
                covers_last = int(rows[-1]) == len(pos) - 1
                spans.append((req, rows, pos[rows] - start + seq.q_start, covers_last))
        if not spans:
            return
        missing = [req for req, _, _, _ in spans if req.image_features is None]
        if missing:
            inputs = [req.mm_inputs for req in missing if req.mm_inputs is not None]
            assert len(inputs) == len(missing), "image positions come with mm_inputs"
            for req, feats in zip(missing, self.runner.image_features(inputs), strict=True):
                req.image_features = feats
        embeds, where = [], []
        for req, rows, flat_pos, covers_last in spans:
            assert req.image_features is not None
            embeds.append(req.image_features[rows.to(req.image_features.device)])
            where.append(flat_pos)
            if covers_last:
                req.image_features = None  # every image token is now in the pool
        batch.image_positions = torch.cat(where).to(self.device)
        batch.image_embeds = torch.cat(embeds)

    # ------------------------------------------------------------------ decode

    @classmethod
    def start_decoding(cls, reqs: list[Req], next_ids: torch.Tensor, runner: ModelRunner) -> ScheduleBatch:
        """A running batch of ``reqs`` whose next input tokens are ``next_ids``."""
        batch = cls(reqs, runner)
        dev = batch.device
        batch.req_pool_indices = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64, device=dev)
        batch.seq_lens = torch.tensor([r.kv_len for r in reqs], dtype=torch.int64, device=dev)
        batch.input_ids = next_ids.to(dev)
        batch.sampling = build_sampling_info(reqs, runner)
        return batch

    def prepare_for_decode(
        self, out_cache_loc: torch.Tensor, layout: DecodeLayout | None = None
    ) -> ForwardBatch:
        """One decode step: each request's next token goes to its slot in ``out_cache_loc``.

        The attention's view of each request's KV is the runner's ``decode_layout`` (on CPU
        the C kernel reading the table in place, or a slot view per request without it; on
        GPU one padded, masked call), or ``layout`` (tests compare them).
        """
        table = self.runner.req_to_token_pool.req_to_token
        positions = self.seq_lens.clone()
        table[self.req_pool_indices, positions] = out_cache_loc
        self.seq_lens += 1
        batch = ForwardBatch(
            mode=ForwardMode.DECODE,
            kv_pool=self.runner.kv_pool,
            input_ids=self.input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
        )
        layout = layout or self.runner.decode_layout
        if layout is DecodeLayout.KERNEL:
            assert self.runner.decode_kernel is not None, "the kernel layout needs the CPU kernel"
            batch.decode_kernel = self.runner.decode_kernel
            batch.kv_table, batch.kv_table_rows, batch.kv_lens = table, self.req_pool_indices, positions + 1
            return batch
        if layout is DecodeLayout.RAGGED:
            rows, lens = self.req_pool_indices.tolist(), self.seq_lens.tolist()
            batch.kv_rows = [table[row, :n] for row, n in zip(rows, lens, strict=True)]
            return batch
        max_len = int(self.seq_lens.max())
        kv_indices = table[self.req_pool_indices, :max_len]
        mask = torch.arange(max_len, device=self.device).unsqueeze(0) < self.seq_lens.unsqueeze(1)
        # Rows past a request's length hold stale slots: point them at the zeroed slot 0.
        batch.kv_indices = kv_indices.masked_fill(~mask, 0)
        batch.kv_mask = mask.view(len(self.reqs), 1, 1, max_len)
        return batch

    # ------------------------------------------------------------------ membership

    def filter(self, keep: list[int]) -> None:
        """Keep only the requests at positions ``keep`` (in order)."""
        if len(keep) == len(self.reqs):
            return
        index = torch.tensor(keep, dtype=torch.int64, device=self.device)
        self.reqs = [self.reqs[i] for i in keep]
        self.req_pool_indices = self.req_pool_indices.index_select(0, index)
        self.seq_lens = self.seq_lens.index_select(0, index)
        self.input_ids = self.input_ids.index_select(0, index)
        self.sampling = build_sampling_info(self.reqs, self.runner)

    def merge(self, other: ScheduleBatch) -> None:
        """Append ``other``'s requests (both must be decode batches)."""
        self.reqs = self.reqs + other.reqs
        self.req_pool_indices = torch.cat([self.req_pool_indices, other.req_pool_indices])
        self.seq_lens = torch.cat([self.seq_lens, other.seq_lens])
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.sampling = build_sampling_info(self.reqs, self.runner)
