"""The ``shm`` fast path: one pre-allocated shared-memory region and a CPU tensor's whole journey.

Journey of a tensor (this module owns every step)::

    sender:   alloc(nbytes) -> ticket + page run      (waits, bounded, when the region is full)
              copy the tensor into the run            (one memcpy; GPU tensors copy to CPU here)
              publish: the handle (ticket, offset, shape, dtype) rides in the pickled metadata
    receiver: view(handle) -> tensor over the slot    (no copy; or copy_out=True: copy, release)
              release: ticket state := RELEASED       (when the last view dies, or at once)
    sender:   next alloc reclaims RELEASED tickets    (pages return to the free map)

Layout of the segment (created by the receiver, which owns and unlinks it; senders attach by
name)::

    [segment header 64 B][region header][ticket state: num_tickets x int32]
    [ticket runs: num_tickets x (start page, num_pages) int32]
    [page map: num_pages x uint8 (1 = used)][pad to 4 KiB][data: num_pages x page_bytes]

Allocation state lives in shared memory, so several threads AND several processes may send
into one region: allocations take a thread lock plus ``flock`` on the segment's own fd (no
lock file; the kernel drops the flock of a killed process). Allocation is best-fit over runs
of free pages, so free neighbours coalesce by construction and releases may come in any
order. A release is one aligned int32 store by the receiver: only the receiver moves a ticket
from IN_USE to RELEASED and only a sender moves it back to FREE, so it needs no lock.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from dpinfer.log import get_logger
from dpinfer.transport.shm import HEADER_BYTES, Segment, create_segment, open_segment

logger = get_logger(__name__)

FREE, IN_USE, RELEASED = 0, 1, 2
_REGION = struct.Struct("<QQQQ")  # page_bytes, num_pages, num_tickets, incarnation
_MIN_PAGE_BYTES = 4096
_MAX_PAGES = 16384
DEFAULT_MAX_TICKETS = 4096


def page_bytes_for(size_bytes: int) -> int:
    """Smallest power-of-two page (>= 4 KiB) that keeps the page map under 16 Ki entries."""
    page = _MIN_PAGE_BYTES
    while size_bytes // page > _MAX_PAGES:
        page *= 2
    return page


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class RegionHandle:
    """What travels on the socket instead of tensor data."""

    incarnation: int
    ticket: int
    offset: int
    shape: tuple[int, ...]
    dtype: str


class ShmRegion:
    """A mapped region. Build with ``create`` (receiver/owner) or ``attach`` (senders)."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.name = segment.name
        mm = segment.mm
        page_bytes, num_pages, num_tickets, incarnation = _REGION.unpack_from(mm, HEADER_BYTES)
        self.page_bytes, self.num_pages = int(page_bytes), int(num_pages)
        self.num_tickets, self.incarnation = int(num_tickets), int(incarnation)
        meta = HEADER_BYTES + _REGION.size
        self._state = np.frombuffer(mm, np.int32, self.num_tickets, meta)
        runs_at = meta + self.num_tickets * 4
        self._runs = np.frombuffer(mm, np.int32, self.num_tickets * 2, runs_at).reshape(-1, 2)
        self._pages = np.frombuffer(mm, np.uint8, self.num_pages, runs_at + self.num_tickets * 8)
        # Scratch for the free-run search: the page map between two "used" sentinels.
        self._padded = np.ones(self.num_pages + 2, np.uint8)
        self._data = torch.frombuffer(
            mm, dtype=torch.uint8, count=self.num_pages * self.page_bytes, offset=segment.payload_offset
        )
        self._lock = threading.Lock()
        self._closed = False
        self.num_waits = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, name: str, size_bytes: int, max_tickets: int = DEFAULT_MAX_TICKETS) -> ShmRegion:
        page_bytes = page_bytes_for(size_bytes)
        num_pages = max(1, size_bytes // page_bytes)
        meta_bytes = HEADER_BYTES + _REGION.size + max_tickets * 12 + num_pages
        header_bytes = _round_up(meta_bytes, 4096)
        segment = create_segment(name, num_pages * page_bytes, header_bytes=header_bytes)
        _REGION.pack_into(segment.mm, HEADER_BYTES, page_bytes, num_pages, max_tickets, secrets.randbits(63))
        segment.payload_offset = header_bytes
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> ShmRegion:
        """Map a region another process created; ``FileNotFoundError`` if it does not exist."""
        segment = open_segment(name)
        page_bytes, num_pages, num_tickets, _ = _REGION.unpack_from(segment.mm, HEADER_BYTES)
        if num_tickets == 0 or page_bytes * num_pages != segment.payload_bytes:
            # Caught between the creator's segment header and its region header.
            segment.close()
            raise ValueError(f"shared-memory region {name} is not initialised yet")
        meta_bytes = HEADER_BYTES + _REGION.size + num_tickets * 12 + num_pages
        segment.payload_offset = _round_up(meta_bytes, 4096)
        return cls(segment)

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; unlink when ``unlink`` (default: when this process created the region)."""
        if self._closed:
            return
        self._closed = True
        del self._state, self._runs, self._pages, self._data
        if self.segment.owner if unlink is None else unlink:
            self.segment.unlink()
        self.segment.close()

    # ------------------------------------------------------------------ sender side

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.capacity_bytes

    def alloc(self, nbytes: int, timeout_s: float) -> tuple[int, int] | None:
        """Reserve ``nbytes``; returns ``(ticket, byte offset)`` or None after ``timeout_s``."""
        if not self.fits(nbytes):
            return None
        need = -(-nbytes // self.page_bytes)
        deadline = time.monotonic() + timeout_s
        delay = 20e-6
        while True:
            got = self._try_alloc(need)
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                return None
            self.num_waits += 1
            # Cross-process wake-ups would need another socket per sender; a full region is
            # the slow path, so back off instead (20 us doubling to 2 ms).
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)

    def _try_alloc(self, need: int) -> tuple[int, int] | None:
        with self._lock:
            fcntl.flock(self.segment.fd, fcntl.LOCK_EX)
            try:
                self._reclaim()
                start = self._best_fit(need)
                if start is None:
                    return None
                ticket = int(np.argmin(self._state))  # FREE is the smallest state
                if self._state[ticket] != FREE:
                    return None
                self._pages[start : start + need] = 1
                self._runs[ticket] = (start, need)
                self._state[ticket] = IN_USE
                return ticket, start * self.page_bytes
            finally:
                fcntl.flock(self.segment.fd, fcntl.LOCK_UN)

    def _reclaim(self) -> None:
        for ticket in np.flatnonzero(self._state == RELEASED):
            start, count = self._runs[ticket]
            self._pages[start : start + count] = 0
            self._state[ticket] = FREE

    def _best_fit(self, need: int) -> int | None:
        # Runs of free pages from the edges of the used map; the smallest run that fits wins.
        if not self._pages.any():
            return 0 if need <= self.num_pages else None
        padded = self._padded
        padded[1:-1] = self._pages
        # Edges alternate free-run start, free-run end because both ends are "used".
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        starts = edges[0::2]
        lengths = edges[1::2] - starts
        fitting = np.flatnonzero(lengths >= need)
        if fitting.size == 0:
            return None
        return int(starts[fitting[np.argmin(lengths[fitting])]])

    def write(self, ticket: int, offset: int, tensor: torch.Tensor) -> RegionHandle:
        """Copy ``tensor`` (any device, any strides) into an allocated slot and return its handle."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < PARALLEL_COPY_BYTES and tensor.device.type == "cpu" and tensor.is_contiguous():
            _copy_bytes(self._data[offset : offset + nbytes], tensor)
        else:
            slot = self._data[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            slot.copy_(tensor.detach())
        return RegionHandle(self.incarnation, ticket, offset, tuple(tensor.shape), _dtype_name(tensor))

    def abandon(self, ticket: int) -> None:
        """Give back a slot that was allocated but never published (e.g. the send failed)."""
        self.release(ticket)

    # ------------------------------------------------------------------ receiver side

    def view(self, handle: RegionHandle, copy_out: bool = False) -> torch.Tensor:
        """The tensor of ``handle``. A view releases its slot when its last reference dies."""
        if handle.incarnation != self.incarnation:
            raise ValueError(f"handle of another incarnation of region {self.name}")
        if not 0 <= handle.ticket < self.num_tickets or self._state[handle.ticket] != IN_USE:
            raise ValueError(f"handle names ticket {handle.ticket}, which is not in use")
        dtype = dtype_from_name(handle.dtype)
        nbytes = int(np.prod(handle.shape, dtype=np.int64)) * dtype.itemsize
        if handle.offset < 0 or handle.offset + nbytes > self.capacity_bytes:
            raise ValueError("handle points outside the region")
        if copy_out:
            out = torch.empty(handle.shape, dtype=dtype)
            slot = self._data[handle.offset : handle.offset + nbytes]
            if nbytes < PARALLEL_COPY_BYTES:
                _copy_bytes(out.view(-1).view(torch.uint8), slot)
            else:
                out.copy_(slot.view(dtype).view(handle.shape))
            self.release(handle.ticket)
            return out
        raw = np.frombuffer(self.segment.mm, np.uint8, nbytes, self.segment.payload_offset + handle.offset)
        # The tensor (and every view of it) holds ``raw``; when the last one dies, free the slot.
        weakref.finalize(raw, _release_if_open, weakref.ref(self), handle.ticket)
        return torch.from_numpy(raw).view(dtype).view(handle.shape)

    def release(self, ticket: int) -> None:
        if not self._closed:
            self._state[ticket] = RELEASED

    # ------------------------------------------------------------------ introspection

    def used_pages(self) -> int:
        """Pages held by live or released-but-not-reclaimed tickets."""
        return int(self._pages.sum())

    def tickets_in_use(self) -> int:
        return int(np.count_nonzero(self._state == IN_USE))

    def creator_pid(self) -> int:
        return self.segment.creator_pid

    def is_owner(self) -> bool:
        return self.segment.owner and self.segment.creator_pid == os.getpid()


# Below this, copy in the calling thread; above, torch's parallel copy pays for its wake-up.
PARALLEL_COPY_BYTES = 4 << 20


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A single-threaded memcpy (numpy, GIL released) of contiguous ``src`` into bytes ``dst``.

    torch's ``copy_`` fans out to its OpenMP pool; after the sender idled between messages
    those threads sleep, and on a busy host waking them cost 5-10 ms per copy (measured on
    2 shared cores: 0.14 GB/s for 1 MiB after a 2 ms idle, against 14.5 GB/s single-threaded).
    With the pool still warm both reach ~20-27 GB/s up to 4 MiB; from 16 MiB two threads win.
    """
    np.copyto(dst.numpy(), src.detach().reshape(-1).view(torch.uint8).numpy())


def _release_if_open(region_ref: weakref.ref[ShmRegion], ticket: int) -> None:
    region = region_ref()
    if region is not None:
        region.release(ticket)


_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r}") from None
