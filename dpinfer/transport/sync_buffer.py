"""``ShmSyncBuffer``: consumption counters in one shared-memory segment.

One segment holds ``num_slots`` int64 counters (not one segment per chunk). Protocol: the
owner resets slot ``i`` to 0 before it publishes the chunk tied to ``i``; each consumer
increments it once, after it has finished reading the chunk (for a GPU chunk: after its
copy-out completed on the device); the owner may reuse the chunk when the counter reaches
the number of consumers. Increments are read-modify-write across processes, so they take
``flock`` on the segment's own fd (no lock file; the kernel drops a dead holder's lock).
"""

from __future__ import annotations

import fcntl
import os
import threading

import numpy as np

from dpinfer.transport.shm import Segment, create_segment, open_segment

_SLOT_BYTES = 8


class ShmSyncBuffer:
    """Counters shared by one owner and its consumers; see the module docstring."""

    _opened: dict[str, ShmSyncBuffer] = {}
    _opened_lock = threading.Lock()

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.name = segment.name
        self.num_slots = segment.payload_bytes // _SLOT_BYTES
        self._counters = np.frombuffer(segment.mm, np.int64, self.num_slots, segment.payload_offset)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def create(cls, name: str, num_slots: int) -> ShmSyncBuffer:
        return cls(create_segment(name, num_slots * _SLOT_BYTES))

    @classmethod
    def open(cls, name: str) -> ShmSyncBuffer:
        """The consumer's handle on ``name``, mapped once per process and cached."""
        with cls._opened_lock:
            buffer = cls._opened.get(name)
            if buffer is None or buffer._closed:
                buffer = cls._opened[name] = cls(open_segment(name))
            return buffer

    @classmethod
    def close_opened(cls) -> None:
        """Unmap every buffer this process opened as a consumer."""
        with cls._opened_lock:
            for buffer in cls._opened.values():
                buffer.close(unlink=False)
            cls._opened.clear()

    @property
    def meta(self) -> dict[str, str]:
        """What a consumer needs to open this buffer."""
        return {"name": self.name}

    def reset(self, slot: int) -> None:
        self._counters[slot] = 0

    def value(self, slot: int) -> int:
        return int(self._counters[slot])

    def increment(self, slot: int) -> int:
        """Add one to ``slot`` atomically across processes; returns the new value."""
        with self._lock:
            fcntl.flock(self.segment.fd, fcntl.LOCK_EX)
            try:
                self._counters[slot] += 1
                return int(self._counters[slot])
            finally:
                fcntl.flock(self.segment.fd, fcntl.LOCK_UN)

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; unlink when ``unlink`` (default: when this process created the segment)."""
        if self._closed:
            return
        self._closed = True
        del self._counters
        owner = self.segment.owner and self.segment.creator_pid == os.getpid()
        if owner if unlink is None else unlink:
            self.segment.unlink()
        self.segment.close()
