"""The paged KV pool (page size 1): slot memory, its free list, and the request->slot table.

- ``KVPool`` holds, per layer, a key and a value buffer of shape ``[num_slots + 1, Hkv, D]``.
  Slot 0 is never handed out: padded gathers point at it, so it is kept zero (finite).
- ``SlotAllocator`` is the free list of slots ``1..num_slots``.
- ``ReqToTokenPool`` maps a request's row and token position to the slot holding its KV.

``kv_pool_tokens`` turns a ``SchedulerConfig`` memory budget into a number of slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpinfer.config import ConfigError, SchedulerConfig

MIN_KV_TOKENS = 16


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV across the model: what a slot costs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA free memory, or ``MemAvailable`` of /proc/meminfo."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (not Linux): assume a modest 4 GiB


def kv_pool_tokens(config: SchedulerConfig, layout: KVLayout, device: torch.device) -> int:
    """Slots in the pool: ``kv_cache_bytes`` (or ``kv_cache_fraction`` of free memory) divided
    by the per-token cost, capped by ``max_kv_tokens``."""
    budget = config.kv_cache_bytes or int(available_memory_bytes(device) * config.kv_cache_fraction)
    tokens = budget // layout.bytes_per_token
    if config.max_kv_tokens:
        tokens = min(tokens, config.max_kv_tokens)
    if tokens < MIN_KV_TOKENS:
        raise ConfigError(
            f"--kv-cache-bytes/--max-kv-tokens: the KV pool would hold {tokens} tokens "
            f"({layout.bytes_per_token} bytes each); need at least {MIN_KV_TOKENS}"
        )
    return int(tokens)


class KVPool:
    """Per-layer key/value buffers indexed by slot. ``release``/``allocate`` drop and rebuild
    the memory (suspend/resume); the slot count never changes. With ``prefault`` every buffer
    is written (zeroed) when allocated, so its memory is committed then (see
    ``SchedulerConfig.kv_prefault``); otherwise only slot 0 is."""

    def __init__(
        self, layout: KVLayout, num_slots: int, device: torch.device, prefault: bool = False
    ) -> None:
        self.layout = layout
        self.num_slots = num_slots
        self.device = device
        self.prefault = prefault
        self.k_buffers: list[torch.Tensor] = []
        self.v_buffers: list[torch.Tensor] = []
        self.allocate()

    @property
    def allocated(self) -> bool:
        return bool(self.k_buffers)

    @property
    def size_bytes(self) -> int:
        return self.num_slots * self.layout.bytes_per_token

    def allocate(self) -> None:
        if self.allocated:
            return
        lay = self.layout
        shape = (self.num_slots + 1, lay.num_kv_heads, lay.head_dim)
        for _ in range(lay.num_layers):
            for buffers in (self.k_buffers, self.v_buffers):
                buf = torch.empty(shape, dtype=lay.dtype, device=self.device)
                (buf if self.prefault else buf[0]).zero_()
                buffers.append(buf)

    def release(self) -> None:
        self.k_buffers, self.v_buffers = [], []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class SlotAllocator:
    """Free list over slots ``1..num_slots`` (kept as a tensor: alloc and free are slices/cats)."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.device = device
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.num_slots + 1, dtype=torch.int64, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._num_pending = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + self._num_pending

    @property
    def num_used(self) -> int:
        return self.num_slots - self.num_free

    def _merge_pending(self) -> None:
        if self._pending:
            self._free = torch.cat([self._free, *self._pending])
            self._pending, self._num_pending = [], 0

    def free_slots(self) -> torch.Tensor:
        """Every free slot (for checks)."""
        self._merge_pending()
        return self._free

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` free slots, or ``None`` (nothing taken) when fewer are free."""
        if n > len(self._free):
            self._merge_pending()
        if n > len(self._free):
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        # Frees are batched: one cat when an alloc needs them, not one per request.
        if len(slots):
            self._pending.append(slots)
            self._num_pending += len(slots)


class ReqToTokenPool:
    """Rows of slot indices, one row per admitted request (``[max_reqs, max_context_len]``)."""

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device) -> None:
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_reqs - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def clear(self) -> None:
        self._free_rows = list(range(len(self.req_to_token) - 1, -1, -1))
