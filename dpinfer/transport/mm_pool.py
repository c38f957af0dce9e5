"""``MmItemMemoryPool`` + ``CudaIpcTensorTransportProxy``: a pooled tensor's whole journey.

This module owns every step (``cuda_ipc_pool`` mode)::

    sender    allocate     best-fit aligned chunk of one pre-allocated workspace + a sync slot
                           (``ShmSyncBuffer``) reset to 0; pool full -> None (caller takes the
                           CPU path, never a raw IPC export; counted in ``num_full``)
              copy in      src -> chunk on the current stream, then record an interprocess
                           event: the receiver must not read before the copy finished
              publish      a proxy: pool handle, offset, shape, dtype, sync slot, event handle
    receiver  open pool    the workspace handle is opened once per process and cached
              copy out     wait on the sender's event on its own stream, copy into a tensor it
                           owns, record its own event and wait for it ...
              acknowledge  ... and only then bump the sync slot (acking earlier lets the
                           sender overwrite a chunk still being read: silent corruption)
    sender    recycle      a recycler thread (and any allocation that finds no room) frees
                           chunks whose slot reached ``num_consumers``

The channel's ``TensorEncoder`` (``codec``) drives the sender steps and unpickling a proxy
drives the receiver steps. The allocator, sync counters and recycler do not depend on
CUDA: the workspace is any 1-D uint8 tensor. On CUDA the handle is the workspace's IPC
export (``CudaWorkspaceHandle``); on CPU the workspace lives in a shared-memory segment
and the handle is its name (``ShmWorkspaceHandle``; no events: CPU copies are
synchronous), which lets the whole journey run in CPU tests. ``shutdown`` stops the
recycler before the workspace and the sync segment are released.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

import torch

from dpinfer.config import shm_name
from dpinfer.log import get_logger
from dpinfer.transport.allocator import BestFitAllocator
from dpinfer.transport.shm import Segment, create_segment, open_segment
from dpinfer.transport.shm_region import dtype_from_name
from dpinfer.transport.sync_buffer import ShmSyncBuffer

logger = get_logger(__name__)

DEFAULT_ALIGNMENT = 256


@dataclass(frozen=True)
class CudaWorkspaceHandle:
    """A CUDA workspace exported by IPC: ``rebuild(*args)`` maps it in another process."""

    rebuild: Callable[..., torch.Tensor]
    args: tuple[object, ...]


@dataclass(frozen=True)
class ShmWorkspaceHandle:
    """A CPU workspace: the shared-memory segment that holds it."""

    segment_name: str


PoolHandle: TypeAlias = CudaWorkspaceHandle | ShmWorkspaceHandle


@dataclass
class MmItemMemoryChunk:
    """A contiguous slice ``[start, end)`` of the pool's workspace and its sync slot."""

    start: int
    mem_size: int
    sync_slot: int
    keepalive: torch.cuda.Event | None = field(default=None, repr=False)
    """The sender's event for this chunk (an IPC event must outlive the receiver's wait)."""

    @property
    def end(self) -> int:
        return self.start + self.mem_size

    def try_to_recycle(self, sync: ShmSyncBuffer, num_consumers: int = 1) -> bool:
        """True once every consumer has acknowledged this chunk."""
        return sync.value(self.sync_slot) >= num_consumers


class MmItemMemoryPool:
    """A bounded workspace handed out in chunks; thread-safe. See the module docstring."""

    def __init__(
        self,
        workspace: torch.Tensor,
        sync: ShmSyncBuffer,
        handle: PoolHandle,
        alignment: int = DEFAULT_ALIGNMENT,
        num_consumers: int = 1,
        recycle_interval_s: float = 0.005,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        assert workspace.dim() == 1 and workspace.dtype == torch.uint8
        self.workspace: torch.Tensor | None = workspace
        self.device = workspace.device
        self.sync = sync
        self.handle = handle
        self.pool_id = f"{os.getpid():x}-{secrets.token_hex(4)}"
        self.num_consumers = num_consumers
        self._allocator = BestFitAllocator(workspace.numel(), alignment)
        self._free_slots = list(range(sync.num_slots - 1, -1, -1))
        self.occupied: dict[int, MmItemMemoryChunk] = {}
        self._lock = threading.Lock()
        self._on_shutdown = on_shutdown
        self.num_allocs = self.num_full = self.num_recycled = 0
        self._stop = threading.Event()
        self._recycler = threading.Thread(
            target=self._recycle_loop, args=(recycle_interval_s,), name="mm-pool-recycler", daemon=True
        )
        self._recycler.start()

    @classmethod
    def for_device(
        cls,
        size_bytes: int,
        device: torch.device | str,
        deployment_id: str,
        rank: int,
        num_consumers: int = 1,
        max_chunks: int = 1024,
    ) -> MmItemMemoryPool:
        """A pool on ``device``: a CUDA workspace shared by IPC handle, or a CPU one in shm."""
        device = torch.device(device)
        token = f"p{os.getpid()}-{secrets.token_hex(3)}"
        sync = ShmSyncBuffer.create(shm_name(deployment_id, rank, f"poolsync-{token}"), max_chunks)
        if device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            workspace = torch.empty(size_bytes, dtype=torch.uint8, device=device)
            rebuild, args = reduce_tensor(workspace)
            handle = CudaWorkspaceHandle(rebuild, tuple(args))
            return cls(workspace, sync, handle, num_consumers=num_consumers)
        segment = create_segment(shm_name(deployment_id, rank, f"pool-{token}"), size_bytes)
        workspace = _segment_tensor(segment)

        def release_segment() -> None:
            segment.unlink()
            segment.close()

        return cls(
            workspace,
            sync,
            ShmWorkspaceHandle(segment.name),
            num_consumers=num_consumers,
            on_shutdown=release_segment,
        )

    # ------------------------------------------------------------------ allocate / recycle

    def allocate(self, nbytes: int) -> MmItemMemoryChunk | None:
        """A chunk of at least ``nbytes`` with its sync slot reset, or None when full."""
        with self._lock:
            if self.workspace is None:
                return None
            chunk = self._allocate_locked(nbytes)
            if chunk is None and self._recycle_locked():
                chunk = self._allocate_locked(nbytes)
            if chunk is None:
                self.num_full += 1
            return chunk

    def _allocate_locked(self, nbytes: int) -> MmItemMemoryChunk | None:
        if not self._free_slots:
            return None
        offset = self._allocator.alloc(nbytes)
        if offset is None:
            return None
        chunk = MmItemMemoryChunk(offset, self._allocator.block_size(offset), self._free_slots.pop())
        self.sync.reset(chunk.sync_slot)
        self.occupied[offset] = chunk
        self.num_allocs += 1
        return chunk

    def get_slice_with_flag(
        self, src: torch.Tensor
    ) -> tuple[MmItemMemoryChunk, torch.Tensor] | tuple[None, None]:
        """Allocate a chunk for ``src`` and copy ``src`` into it; ``(None, None)`` when full."""
        nbytes = src.numel() * src.element_size()
        chunk = self.allocate(nbytes)
        if chunk is None:
            return None, None
        assert self.workspace is not None
        view = self.workspace[chunk.start : chunk.start + nbytes].view(src.dtype).view(src.shape)
        view.copy_(src.detach(), non_blocking=True)
        return chunk, view

    def recycle_once(self) -> int:
        """Free every chunk all consumers acknowledged; returns how many."""
        with self._lock:
            return self._recycle_locked()

    def _recycle_locked(self) -> int:
        if self.workspace is None:
            return 0
        done = [c for c in self.occupied.values() if c.try_to_recycle(self.sync, self.num_consumers)]
        for chunk in done:
            del self.occupied[chunk.start]
            self._allocator.free(chunk.start)
            self._free_slots.append(chunk.sync_slot)
            chunk.keepalive = None
        self.num_recycled += len(done)
        return len(done)

    def _recycle_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.recycle_once()
            except Exception:  # the recycler must outlive one bad pass
                logger.exception("mm pool recycler pass failed")

    # ------------------------------------------------------------------ lifecycle

    @property
    def recycler_alive(self) -> bool:
        return self._recycler.is_alive()

    @property
    def used_bytes(self) -> int:
        return self._allocator.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._allocator.capacity_bytes

    def shutdown(self) -> None:
        """Stop the recycler, then release the workspace and unlink the sync segment."""
        self._stop.set()
        if self._recycler.is_alive() and threading.current_thread() is not self._recycler:
            self._recycler.join(timeout=5.0)
        with self._lock:
            if self.workspace is None:
                return
            if self.occupied:
                logger.info("mm pool shut down with %d chunk(s) unacknowledged", len(self.occupied))
            self.occupied.clear()
            self.workspace = None
        self.sync.close(unlink=True)
        if self._on_shutdown is not None:
            self._on_shutdown()


@dataclass(frozen=True)
class CudaIpcTensorTransportProxy:
    """A tensor published through a pool chunk; pickles as handles only (see module docstring)."""

    pool_id: str
    pool_handle: PoolHandle
    offset: int
    shape: tuple[int, ...]
    dtype: str
    sync_name: str
    sync_slot: int
    event_handle: bytes | None

    @classmethod
    def publish(cls, pool: MmItemMemoryPool, tensor: torch.Tensor) -> CudaIpcTensorTransportProxy | None:
        """Copy ``tensor`` into ``pool`` and describe it; None when the pool is full."""
        if pool.device.type != "cuda":
            chunk, _view = pool.get_slice_with_flag(tensor)
            if chunk is None:
                return None
            event_handle = None
        else:
            # The copy and the event on one stream: the pool device's current stream (the
            # current device may be another GPU, whose stream the event would not cover).
            with torch.cuda.device(pool.device):
                stream = torch.cuda.current_stream(pool.device)
                if tensor.is_cuda and tensor.device == pool.device:
                    # The caller may free ``tensor`` as soon as we return: its memory must not be
                    # reused before the copy (queued on ``stream``, maybe not its own) has run.
                    tensor.record_stream(stream)
                chunk, _view = pool.get_slice_with_flag(tensor)
                if chunk is None:
                    return None
                event = torch.cuda.Event(interprocess=True)
                event.record(stream)
            chunk.keepalive = event  # the producer keeps its event alive until the ack
            event_handle = event.ipc_handle()
        dtype = str(tensor.dtype).removeprefix("torch.")
        return cls(
            pool.pool_id,
            pool.handle,
            chunk.start,
            tuple(tensor.shape),
            dtype,
            pool.sync.name,
            chunk.sync_slot,
            event_handle,
        )

    def reconstruct_on_device(self, device_index: int | None = None) -> torch.Tensor:
        """Receiver side: copy out into a tensor this process owns, then acknowledge."""
        workspace = _open_pool(self.pool_id, self.pool_handle)
        dtype = dtype_from_name(self.dtype)
        nbytes = dtype.itemsize
        for dim in self.shape:
            nbytes *= dim
        src = workspace[self.offset : self.offset + nbytes].view(dtype).view(self.shape)
        if workspace.is_cuda:
            out = _copy_out_cuda(src, self.event_handle, device_index)
        else:
            target = "cpu" if device_index is None else torch.device("cuda", device_index)
            out = src.to(target, copy=True)
        ShmSyncBuffer.open(self.sync_name).increment(self.sync_slot)
        return out


def _copy_out_cuda(src: torch.Tensor, event_handle: bytes | None, device_index: int | None) -> torch.Tensor:
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream()
        if event_handle is not None:
            stream.wait_event(torch.cuda.Event.from_ipc_handle(src.device, event_handle))
        target = src.device if device_index is None else torch.device("cuda", device_index)
        out = torch.empty(src.shape, dtype=src.dtype, device=target)
        out.copy_(src)
        done = torch.cuda.Event()
        done.record(stream)
        # The ack must not overtake the copy: wait for it before the counter moves.
        done.synchronize()
    return out


_opened_pools: dict[str, tuple[torch.Tensor, Segment | None]] = {}
_opened_lock = threading.Lock()


def _open_pool(pool_id: str, handle: PoolHandle) -> torch.Tensor:
    """The workspace of pool ``pool_id``, opened once per process."""
    with _opened_lock:
        cached = _opened_pools.get(pool_id)
        if cached is None:
            if isinstance(handle, CudaWorkspaceHandle):
                cached = (handle.rebuild(*handle.args), None)
            else:
                segment = open_segment(handle.segment_name)
                cached = (_segment_tensor(segment), segment)
            _opened_pools[pool_id] = cached
        return cached[0]


def close_opened_pools() -> None:
    """Forget every pool this process opened as a receiver (and unmap CPU ones)."""
    with _opened_lock:
        for _, segment in _opened_pools.values():
            if segment is not None:
                segment.close()
        _opened_pools.clear()
    ShmSyncBuffer.close_opened()


def _segment_tensor(segment: Segment) -> torch.Tensor:
    return torch.frombuffer(
        segment.mm, dtype=torch.uint8, count=segment.payload_bytes, offset=segment.payload_offset
    )
