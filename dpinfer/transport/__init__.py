"""Tensor transport inside one engine rank (TokenizerProcess -> SchedulerProcess).

- ``channel``: the ordered request channel (``make_sender`` / ``make_receiver``), the seam
  the tokenizer and scheduler use.
- ``modes``: the one registry of ``--transport`` modes (``zmq``, ``shm``, ``tensor_queue``)
  and the tensor route each end uses.
- ``codec``: the one tensor codec: pickling with per-tensor routes (inline, shm region,
  tensor queue, CUDA IPC, CUDA IPC pool); ``wrap_mm_inputs_for_ipc`` /
  ``unwrap_mm_inputs_from_ipc`` are its names for one object without a channel.
- ``shm``: POSIX shared-memory segments and their hygiene (``cleanup_stale_segments``).
- ``shm_region`` / ``shm_route``: the pre-allocated region of the ``shm`` fast path.
- ``allocator`` / ``sync_buffer`` / ``mm_pool``: ``MmItemMemoryPool`` (device-agnostic
  best-fit pool with a recycler), ``ShmSyncBuffer`` counters, ``CudaIpcTensorTransportProxy``
  (``cuda_ipc_pool``: ``mm_pool`` owns a pooled tensor's whole journey).
- ``cuda_ipc``: ``TransportProxyTensor`` (``cuda_ipc``: a CUDA tensor pickled as its handle).
- ``tensor_queue``: ``TensorIpcSender`` / ``TensorIpcReceiver`` over a torch.mp queue.

Importing this package does not import torch; the modules that need it import it.
May import: ``config``, ``log``, ``errors``; never ``protocol`` or anything above.
"""

from dpinfer.transport.channel import (
    RequestReceiver,
    RequestSender,
    TransportError,
    make_receiver,
    make_sender,
    make_tensor_queue,
)
from dpinfer.transport.shm import cleanup_stale_segments

__all__ = [
    "RequestReceiver",
    "RequestSender",
    "TransportError",
    "cleanup_stale_segments",
    "make_receiver",
    "make_sender",
    "make_tensor_queue",
]
