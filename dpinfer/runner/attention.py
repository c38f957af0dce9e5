"""Attention over the paged KV pool, plugged into ``transformers`` model code.

The model is called on one flattened sequence (all requests' new tokens back to back,
``position_ids`` restarting per request, ``use_cache=False``) with a ``ForwardBatch`` passed
as the keyword argument ``dp_batch``; Llama-family models forward unknown keyword arguments
to the attention function of every layer, which is ``paged_attention`` once
``register()`` has run and the model selected ``ATTENTION_NAME``.

A *mixed* batch (``ForwardMode.MIXED``, ``mixed_forward_batch``) is a decode batch and an
extend batch in one pass: the ``num_decode`` decode tokens come first (one per running
request, attended like a decode batch), the prompt chunks after them (attended like an
extend batch), so prefilling a prompt never stops the running requests' streams.

A decode batch describes each request's KV in one of three ``DecodeLayout``s: padded (GPU),
the C kernel's table rows and lengths (CPU, ``paged_attention.c``), or a slot view per
request (CPU without a C compiler).

Contract of the attention function (checked against transformers 5.23): it receives
``query [1, H, T, D]`` and ``key/value [1, Hkv, T, D]`` with rotary embeddings applied, and
returns ``(out, None)`` with ``out`` laid out ``[1, T, H, D]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from dpinfer.runner.cpu_kernel import DecodeKernel
from dpinfer.runner.kv_pool import KVPool

ATTENTION_NAME = "dpinfer_paged"


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    """Several new tokens per request (prefill, or a prefill chunk after a cached prefix)."""
    DECODE = "decode"
    """Exactly one new token per request."""
    MIXED = "mixed"
    """``num_decode`` decode tokens (one per running request), then extend sequences."""


class DecodeLayout(enum.Enum):
    """How a decode batch describes each request's KV to the attention."""

    PADDED = "padded"
    """``kv_indices [B, Lmax]`` and ``kv_mask``: one masked call (GPU: one launch)."""
    RAGGED = "ragged"
    """``kv_rows``: a slot view and a small attention call per request (CPU, torch only)."""
    KERNEL = "kernel"
    """``kv_table`` rows and ``kv_lens``: the C kernel reads the KV in place (CPU)."""


@dataclass
class ExtendSeq:
    """One request inside an extend batch."""

    q_start: int
    """Offset of its first new token in the flattened batch."""
    q_len: int
    prefix_len: int
    """Tokens whose KV is already in the pool (cached prefix or earlier chunks)."""
    kv_indices: torch.Tensor | None = None
    """Slots of all ``prefix_len + q_len`` tokens (only when ``prefix_len > 0``)."""
    mask: torch.Tensor | None = None
    """Bottom-right aligned causal mask ``[q_len, prefix_len + q_len]`` (only with a prefix)."""


@dataclass
class ForwardBatch:
    """Everything one forward pass needs besides the model (built once, read by every layer)."""

    mode: ForwardMode
    kv_pool: KVPool
    input_ids: torch.Tensor
    """``[T]`` new tokens, flattened over requests."""
    positions: torch.Tensor
    """``[T]`` position of each new token in its own request."""
    out_cache_loc: torch.Tensor
    """``[T]`` slot each new token's K/V is written to."""
    logits_indices: torch.Tensor | None = None
    """Rows of ``[T]`` whose logits are returned; ``None`` returns all (decode)."""
    extend_seqs: list[ExtendSeq] = field(default_factory=list)
    kv_indices: torch.Tensor | None = None
    """Padded decode: ``[B, Lmax]`` slots of every request's tokens, padded with slot 0."""
    kv_mask: torch.Tensor | None = None
    """Padded decode: ``[B, 1, 1, Lmax]`` True where ``kv_indices`` is a real token."""
    kv_rows: list[torch.Tensor] | None = None
    """Ragged decode: the slots of each request's tokens (one tensor per request)."""
    decode_kernel: DecodeKernel | None = None
    """Kernel decode: request ``b`` sees slots ``kv_table[kv_table_rows[b], :kv_lens[b]]``."""
    kv_table: torch.Tensor | None = None
    kv_table_rows: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    image_positions: torch.Tensor | None = None
    """Extend with images: ``[K]`` rows of ``[T]`` whose input embedding is an image feature."""
    image_embeds: torch.Tensor | None = None
    """Extend with images: ``[K, hidden]`` features written at ``image_positions``."""
    num_decode: int = 0
    """Mixed: the first ``num_decode`` rows of ``[T]`` are decode tokens (the rest extend)."""


def mixed_forward_batch(decode: ForwardBatch, extend: ForwardBatch) -> ForwardBatch:
    """One pass computing ``decode``'s tokens first, then ``extend``'s (``ForwardMode.MIXED``).

    The extend part is shifted by the decode tokens: its ``q_start``s, logits rows and image
    rows. Logits come back in the same order: one row per decode request, then the extend
    batch's kept rows.
    """
    assert decode.mode is ForwardMode.DECODE and extend.mode is ForwardMode.EXTEND
    b = len(decode.input_ids)
    device = decode.input_ids.device
    assert extend.logits_indices is not None, "an extend batch names its kept rows"
    seqs = [
        ExtendSeq(s.q_start + b, s.q_len, s.prefix_len, kv_indices=s.kv_indices, mask=s.mask)
        for s in extend.extend_seqs
    ]
    return ForwardBatch(
        mode=ForwardMode.MIXED,
        kv_pool=decode.kv_pool,
        input_ids=torch.cat([decode.input_ids, extend.input_ids]),
        positions=torch.cat([decode.positions, extend.positions]),
        out_cache_loc=torch.cat([decode.out_cache_loc, extend.out_cache_loc]),
        logits_indices=torch.cat([torch.arange(b, device=device), extend.logits_indices + b]),
        extend_seqs=seqs,
        kv_indices=decode.kv_indices,
        kv_mask=decode.kv_mask,
        kv_rows=decode.kv_rows,
        decode_kernel=decode.decode_kernel,
        kv_table=decode.kv_table,
        kv_table_rows=decode.kv_table_rows,
        kv_lens=decode.kv_lens,
        image_positions=None if extend.image_positions is None else extend.image_positions + b,
        image_embeds=extend.image_embeds,
        num_decode=b,
    )


def bottom_right_causal_mask(q_len: int, prefix_len: int, device: torch.device) -> torch.Tensor:
    """``mask[i, j]`` is True when query ``i`` (at position ``prefix_len + i``) may see key ``j``."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + prefix_len
    cols = torch.arange(prefix_len + q_len, device=device).unsqueeze(0)
    return cols <= rows


def _extend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: ForwardBatch,
    layer: int,
    scaling: float | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Attention of every extend sequence, written into its rows of ``out [1, T, H, D]``."""
    k_buf, v_buf = batch.kv_pool.k_buffers[layer], batch.kv_pool.v_buffers[layer]
    for seq in batch.extend_seqs:
        end = seq.q_start + seq.q_len
        q = query[:, :, seq.q_start : end]
        if seq.prefix_len == 0:
            k, v = key[:, :, seq.q_start : end], value[:, :, seq.q_start : end]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            assert seq.kv_indices is not None and seq.mask is not None
            k = k_buf.index_select(0, seq.kv_indices).transpose(0, 1).unsqueeze(0)
            v = v_buf.index_select(0, seq.kv_indices).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seq.mask, scale=scaling, enable_gqa=True)
        out[0, seq.q_start : end] = o[0].transpose(0, 1)
    return out


def _decode_ragged(
    query: torch.Tensor, batch: ForwardBatch, layer: int, scaling: float | None
) -> torch.Tensor:
    # One small attention per request: on CPU this beats one padded call, which gathers
    # and attends over max_len for every request (measured ~2x at lengths 30-500).
    assert batch.kv_rows is not None
    k_buf, v_buf = batch.kv_pool.k_buffers[layer], batch.kv_pool.v_buffers[layer]
    _, num_heads, _, head_dim = query.shape
    num_kv = k_buf.shape[1]
    rows = query[0].transpose(0, 1)  # [T, H, D]
    out = query.new_empty(1, len(batch.kv_rows), num_heads, head_dim)
    for i, slots in enumerate(batch.kv_rows):
        k = k_buf.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        v = v_buf.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        q = rows[i].reshape(1, num_kv, num_heads // num_kv, head_dim)  # query groups, see _decode
        out[0, i] = F.scaled_dot_product_attention(q, k, v, scale=scaling).view(num_heads, head_dim)
    return out


def _decode_kernel(
    query: torch.Tensor, batch: ForwardBatch, layer: int, scaling: float | None
) -> torch.Tensor:
    # One C call per layer over every request's KV in place (see paged_attention.c); it
    # computes in fp32 whatever the pool holds.
    assert batch.decode_kernel is not None and batch.kv_table is not None
    assert batch.kv_table_rows is not None and batch.kv_lens is not None
    _, num_heads, bsz, head_dim = query.shape
    out = torch.empty(bsz, num_heads, head_dim, dtype=torch.float32, device=query.device)
    batch.decode_kernel(
        query[0].transpose(0, 1).contiguous().float(),
        batch.kv_pool.k_buffers[layer],
        batch.kv_pool.v_buffers[layer],
        batch.kv_table,
        batch.kv_table_rows,
        batch.kv_lens,
        scaling if scaling is not None else head_dim**-0.5,
        out,
    )
    return out.to(query.dtype).unsqueeze(0)


def _decode(query: torch.Tensor, batch: ForwardBatch, layer: int, scaling: float | None) -> torch.Tensor:
    """Attention of one new token per request, ``query [1, H, B, D]`` -> ``[1, B, H, D]``.

    With grouped-query attention the ``H / Hkv`` query heads of one KV head attend as that
    head's query rows (``[Hkv, G, D]``): one token sees every key, so no mask is needed and
    the KV heads are never repeated (measured 1.5-2x faster than ``enable_gqa`` on CPU).
    """
    if batch.decode_kernel is not None:
        return _decode_kernel(query, batch, layer, scaling)
    if batch.kv_rows is not None:
        return _decode_ragged(query, batch, layer, scaling)
    assert batch.kv_indices is not None and batch.kv_mask is not None
    _, num_heads, bsz, head_dim = query.shape
    k_buf, v_buf = batch.kv_pool.k_buffers[layer], batch.kv_pool.v_buffers[layer]
    num_kv = k_buf.shape[1]
    max_len = batch.kv_indices.shape[1]
    flat = batch.kv_indices.view(-1)
    k = k_buf.index_select(0, flat).view(bsz, max_len, *k_buf.shape[1:]).transpose(1, 2)
    v = v_buf.index_select(0, flat).view(bsz, max_len, *v_buf.shape[1:]).transpose(1, 2)
    q = query[0].transpose(0, 1).reshape(bsz, num_kv, num_heads // num_kv, head_dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.kv_mask, scale=scaling)
    return o.view(1, bsz, num_heads, head_dim)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    dp_batch: ForwardBatch | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Write this layer's new K/V into the pool, then attend over each request's full KV."""
    if dp_batch is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs a ForwardBatch (dp_batch=...)")
    layer = cast(int, module.layer_idx)  # a plain int attribute, not a parameter or submodule
    pool = dp_batch.kv_pool
    loc = dp_batch.out_cache_loc
    pool.k_buffers[layer].index_copy_(0, loc, key[0].transpose(0, 1))
    pool.v_buffers[layer].index_copy_(0, loc, value[0].transpose(0, 1))
    if dp_batch.mode is ForwardMode.DECODE:
        return _decode(query, dp_batch, layer, scaling), None
    _, num_heads, total, head_dim = query.shape
    out = query.new_empty(1, total, num_heads, head_dim)
    b = dp_batch.num_decode
    if b:
        out[:, :b] = _decode(query[:, :, :b], dp_batch, layer, scaling)
    return _extend(query, key, value, dp_batch, layer, scaling, out), None


_registered = False


def register() -> None:
    """Make ``ATTENTION_NAME`` selectable with ``model.set_attn_implementation``."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, paged_attention)
        _registered = True
