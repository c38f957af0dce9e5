"""A best-fit range allocator over ``[0, capacity)`` bytes (no device, no threads).

Sizes are rounded up to ``alignment`` (a power of two), so every offset handed out is
aligned. A free merges with free neighbours at once, so the free list never holds two
adjacent blocks. Used by ``MmItemMemoryPool``; the caller provides locking.
"""

from __future__ import annotations

import bisect


class BestFitAllocator:
    def __init__(self, capacity_bytes: int, alignment: int = 256) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.capacity_bytes = capacity_bytes // alignment * alignment
        if self.capacity_bytes <= 0:
            raise ValueError(f"capacity {capacity_bytes} is smaller than one aligned block")
        self._free_offsets: list[int] = [0]  # sorted
        self._free_sizes: dict[int, int] = {0: self.capacity_bytes}
        self._used: dict[int, int] = {}

    def aligned_size(self, nbytes: int) -> int:
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new block of at least ``nbytes``; None when no free block fits."""
        size = self.aligned_size(nbytes)
        best: int | None = None
        for offset in self._free_offsets:
            free = self._free_sizes[offset]
            if free >= size and (best is None or free < self._free_sizes[best]):
                best = offset
                if free == size:
                    break
        if best is None:
            return None
        free = self._free_sizes.pop(best)
        index = bisect.bisect_left(self._free_offsets, best)
        if free == size:
            del self._free_offsets[index]
        else:
            # Keep the tail free; the block starts at the aligned front of the hole.
            self._free_offsets[index] = best + size
            self._free_sizes[best + size] = free - size
        self._used[best] = size
        return best

    def free(self, offset: int) -> None:
        """Return a block; raises ``KeyError`` for an offset that is not allocated."""
        size = self._used.pop(offset)
        index = bisect.bisect_left(self._free_offsets, offset)
        # Merge with the following block, then with the preceding one.
        if index < len(self._free_offsets) and self._free_offsets[index] == offset + size:
            size += self._free_sizes.pop(self._free_offsets.pop(index))
        if index > 0:
            prev = self._free_offsets[index - 1]
            if prev + self._free_sizes[prev] == offset:
                self._free_sizes[prev] += size
                return
        self._free_offsets.insert(index, offset)
        self._free_sizes[offset] = size

    def block_size(self, offset: int) -> int:
        return self._used[offset]

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def largest_free_bytes(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_offsets)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    def free_blocks(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of every free block in offset order (for tests and stats)."""
        return [(o, self._free_sizes[o]) for o in self._free_offsets]
