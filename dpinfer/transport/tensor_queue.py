"""Tensors through a ``torch.multiprocessing`` queue (the ``tensor_queue`` transport).

Journey of a tensor (this module owns every step)::

    sender:   copy into a fresh shared-memory tensor, put (sender_id, message_id, tensor_id,
              tensor) on the queue (bounded wait), publish the ids as the handle
    receiver: drain the queue into per-sender buffers until the handle's tensor is there
              (bounded wait); older unclaimed tensors of that sender are stale and dropped
    release:  torch's own refcounting frees the shared memory when both sides drop it

The queue is made once in the parent (``new_tensor_queue``) and passed to both processes at
spawn; it cannot be found by name. Pitfall (NOTES §3): unpickling a queued CPU tensor needs
its sender alive, so a receiver whose sender exited gets ``TransportError`` for that message
(the channel drops and counts it) instead of a crash.
"""

from __future__ import annotations

import os
import queue as queue_mod
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.multiprocessing as torch_mp

from dpinfer.errors import DpinferError
from dpinfer.log import get_logger
from dpinfer.transport.codec import RouteHandle, TensorRoute, expect_handle

logger = get_logger(__name__)


class TensorQueueError(DpinferError):
    """A queued tensor could not be received (timed out, or its sender is gone)."""


@dataclass(frozen=True)
class TensorIpcHandle:
    """What travels in the metadata instead of the tensor."""

    sender_id: str
    message_id: int
    tensor_id: int


@dataclass
class TensorIpcData:
    """One queue item."""

    sender_id: str
    message_id: int
    tensor_id: int
    tensor: torch.Tensor


class TensorQueue(Protocol):
    """What both ends need of the queue ``new_tensor_queue`` makes (a ``multiprocessing`` queue
    of ``TensorIpcData``; one typed ``Queue[object]`` fits too, the receiver checks each item)."""

    def put(self, obj: TensorIpcData, *, timeout: float | None = None) -> None: ...

    def get(self, *, timeout: float | None = None) -> object: ...

    def close(self) -> None: ...

    def join_thread(self) -> None: ...


def new_tensor_queue(maxsize: int = 0) -> TensorQueue:
    """A queue for ``TensorIpcSender`` / ``TensorIpcReceiver`` (spawn context)."""
    return torch_mp.get_context("spawn").Queue(maxsize)


class TensorIpcSender:
    """Puts tensors on the queue and returns their handles; ``new_message`` starts a message."""

    def __init__(self, queue: TensorQueue, put_timeout_s: float = 10.0) -> None:
        self.queue = queue
        self.put_timeout_s = put_timeout_s
        self.sender_id = f"{os.getpid():x}-{secrets.token_hex(3)}"
        self._message_id = 0
        self._tensor_id = 0
        self.num_failed = 0

    def new_message(self) -> None:
        self._message_id += 1
        self._tensor_id = 0

    def __call__(self, tensor: torch.Tensor) -> TensorIpcHandle | None:
        """Queue ``tensor`` (a snapshot: later edits by the caller are not seen); None on failure."""
        # A fresh shared tensor per send keeps the caller's tensor private (share_memory_()
        # would move the caller's whole storage into shared memory).
        shared = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
        shared.copy_(tensor.detach())
        handle = TensorIpcHandle(self.sender_id, self._message_id, self._tensor_id)
        try:
            item = TensorIpcData(handle.sender_id, handle.message_id, handle.tensor_id, shared)
            self.queue.put(item, timeout=self.put_timeout_s)
        except (queue_mod.Full, ValueError, OSError) as e:
            self.num_failed += 1
            logger.warning("tensor queue put failed (%s); the tensor goes inline", e)
            return None
        self._tensor_id += 1
        return handle

    def close(self, close_queue: bool = False) -> None:
        """With ``close_queue``, flush the feeder thread and close the queue for this process.

        By default the queue stays usable (it belongs to whoever made it): at process exit
        ``multiprocessing`` flushes the feeder thread anyway.
        """
        if close_queue:
            self.queue.close()
            self.queue.join_thread()


@dataclass
class _SenderBuffer:
    current_message_id: int = -1
    tensors: OrderedDict[int, dict[int, torch.Tensor]] = field(default_factory=OrderedDict)


class TensorIpcReceiver:
    """Returns the tensor of a handle, draining and buffering everything else that arrives."""

    def __init__(self, queue: TensorQueue, get_timeout_s: float = 10.0, max_buffered: int = 4096) -> None:
        self.queue = queue
        self.get_timeout_s = get_timeout_s
        self.max_buffered = max_buffered
        self._buffers: dict[str, _SenderBuffer] = {}
        self.num_stale = 0

    def __call__(self, handle: TensorIpcHandle) -> torch.Tensor:
        deadline = time.monotonic() + self.get_timeout_s
        while True:
            tensor = self._take(handle)
            if tensor is not None:
                return tensor
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TensorQueueError(f"tensor {handle} did not arrive within {self.get_timeout_s}s")
            self._store(self._get(remaining))

    def close(self) -> None:
        """Drop every buffered tensor (the queue itself belongs to whoever made it)."""
        self._buffers.clear()

    def _get(self, timeout_s: float) -> TensorIpcData:
        try:
            item = self.queue.get(timeout=timeout_s)
        except queue_mod.Empty:
            raise TensorQueueError(f"no tensor arrived within {self.get_timeout_s}s") from None
        except (FileNotFoundError, ConnectionError, EOFError) as e:
            # The sender exited before we mapped its shared memory (NOTES §3).
            raise TensorQueueError(f"tensor queue sender is gone: {e!r}") from e
        if not isinstance(item, TensorIpcData):
            raise TensorQueueError(f"the tensor queue carried a {type(item).__name__}, not TensorIpcData")
        return item

    def _take(self, handle: TensorIpcHandle) -> torch.Tensor | None:
        sender = self._buffers.get(handle.sender_id)
        if sender is None:
            return None
        tensor = sender.tensors.get(handle.message_id, {}).pop(handle.tensor_id, None)
        if tensor is None:
            return None
        if sender.current_message_id != handle.message_id:
            # Moving to a newer message: whatever older messages left unclaimed is stale.
            for message_id in [m for m in sender.tensors if m < handle.message_id]:
                self.num_stale += len(sender.tensors.pop(message_id))
            sender.current_message_id = handle.message_id
        if not sender.tensors.get(handle.message_id, True):
            sender.tensors.pop(handle.message_id, None)
        return tensor

    def _store(self, item: TensorIpcData) -> None:
        sender = self._buffers.setdefault(item.sender_id, _SenderBuffer())
        if item.message_id < sender.current_message_id:
            self.num_stale += 1
            logger.warning("ignoring a stale tensor from sender %s", item.sender_id)
            return
        sender.tensors.setdefault(item.message_id, {})[item.tensor_id] = item.tensor
        if sum(len(t) for t in sender.tensors.values()) > self.max_buffered:
            _, dropped = sender.tensors.popitem(last=False)
            self.num_stale += len(dropped)
            logger.warning("tensor queue buffer over %d; dropped the oldest message", self.max_buffered)


class QueueSenderRoute(TensorRoute):
    """``TensorIpcSender`` as the channel's tensor route."""

    name = "tensor_queue"
    # Queue order must match socket order (the receiver drops older unclaimed messages as
    # stale), so the channel encodes and sends one message at a time.
    serial = True

    def __init__(self, queue: TensorQueue, timeout_s: float) -> None:
        self.sender = TensorIpcSender(queue, put_timeout_s=timeout_s)

    def begin_message(self) -> None:
        self.sender.new_message()

    def publish(self, tensor: torch.Tensor) -> TensorIpcHandle | None:
        return self.sender(tensor)

    def stats(self) -> dict[str, int]:
        return {"num_queue_failed": self.sender.num_failed}

    def close(self) -> None:
        self.sender.close()


class QueueReceiverRoute(TensorRoute):
    """``TensorIpcReceiver`` as the channel's tensor route."""

    name = "tensor_queue"

    def __init__(self, queue: TensorQueue, timeout_s: float) -> None:
        self.receiver = TensorIpcReceiver(queue, get_timeout_s=max(timeout_s, 1.0))

    def resolve(self, handle: RouteHandle) -> torch.Tensor:
        return self.receiver(expect_handle(handle, TensorIpcHandle))

    def close(self) -> None:
        self.receiver.close()
