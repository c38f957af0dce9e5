"""CUDA IPC wrappers for tensors handed to another local process, and the nested walkers.

- ``TransportProxyTensor``: a ``torch.Tensor`` subclass whose pickle is a CUDA IPC handle
  (``cuda_ipc`` mode). Simple and copy-free, but PyTorch keeps the exported allocation alive
  until the SENDER EXITS: every exported tensor's memory stays pinned, so a long-running
  service leaks device memory. Prefer ``cuda_ipc_pool`` (``mm_pool``) there.
- ``wrap_mm_inputs_for_ipc`` / ``unwrap_mm_inputs_from_ipc`` walk dicts, lists, tuples and
  every ``Mapping`` (``transformers.BatchFeature`` is a ``UserDict``, not a ``dict``; a
  walker that only knows ``dict`` silently skips it) and replace the tensors for IPC.

Importing this module never needs CUDA; the CUDA work happens when a CUDA tensor is pickled.
"""

from __future__ import annotations

import copy
from collections import UserDict
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from dpinfer.config import TensorTransportMode
from dpinfer.log import get_logger
from dpinfer.transport.mm_pool import CudaIpcTensorTransportProxy, MmItemMemoryPool

logger = get_logger(__name__)


class TransportProxyTensor(torch.Tensor):
    """A tensor whose pickle carries a CUDA IPC handle instead of its data.

    The receiver maps the very same device memory (no copy). Caveat: the allocation stays
    pinned until the sender process exits, even after both sides dropped the tensor. A CPU
    tensor pickles normally.
    """

    @staticmethod
    def wrap(tensor: torch.Tensor) -> TransportProxyTensor:
        return tensor.as_subclass(TransportProxyTensor)

    def __reduce_ex__(self, protocol: Any) -> Any:
        plain = self.as_subclass(torch.Tensor)
        if not plain.is_cuda:
            return plain.__reduce_ex__(protocol)
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(plain.detach())


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of ``obj`` with ``fn`` applied to every tensor in dicts, lists, tuples and Mappings.

    Container types are kept (``BatchFeature`` stays a ``BatchFeature``, a namedtuple stays
    one); anything else is returned as is. ``obj`` itself is not modified.
    """
    return _walk(obj, lambda value: isinstance(value, torch.Tensor), fn)


def _walk(obj: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    if is_leaf(obj):
        return fn(obj)
    if isinstance(obj, UserDict):
        out = copy.copy(obj)
        out.data = {k: _walk(v, is_leaf, fn) for k, v in obj.data.items()}
        return out
    if isinstance(obj, Mapping):
        items = {k: _walk(v, is_leaf, fn) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:
            # Mapping has no constructor signature; a subclass that takes a dict is the common case.
            return cast(Callable[[dict[Any, Any]], Any], type(obj))(items)
        except TypeError:
            return items
    if isinstance(obj, list):
        return [_walk(v, is_leaf, fn) for v in obj]
    if isinstance(obj, tuple):
        values = [_walk(v, is_leaf, fn) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return obj


def wrap_mm_inputs_for_ipc(
    mm_inputs: Any,
    transport_mode: TensorTransportMode | str,
    pool: MmItemMemoryPool | None = None,
) -> Any:
    """Replace tensors for IPC according to ``transport_mode``; returns a new structure.

    - ``default``: unchanged (tensors travel by the CPU path downstream).
    - ``cuda_ipc``: CUDA tensors become ``TransportProxyTensor``.
    - ``cuda_ipc_pool``: tensors on ``pool.device`` are copied into ``pool`` and become
      ``CudaIpcTensorTransportProxy``; when the pool is full they are copied to CPU (never a
      raw IPC export) and the pool counts it in ``num_full``.
    """
    mode = TensorTransportMode(transport_mode)
    if mode is TensorTransportMode.DEFAULT or mm_inputs is None:
        return mm_inputs
    if mode is TensorTransportMode.CUDA_IPC:
        return map_tensors(mm_inputs, lambda t: TransportProxyTensor.wrap(t) if t.is_cuda else t)
    if pool is None:
        raise ValueError("cuda_ipc_pool needs the sender's MmItemMemoryPool (pool=...)")

    def to_pool(tensor: torch.Tensor) -> Any:
        if tensor.device != pool.device:
            return tensor
        proxy = CudaIpcTensorTransportProxy.publish(pool, tensor)
        return proxy if proxy is not None else tensor.cpu()

    return map_tensors(mm_inputs, to_pool)


def unwrap_mm_inputs_from_ipc(mm_inputs: Any, device_index: int | None = None) -> Any:
    """Receiver side of ``wrap_mm_inputs_for_ipc``: proxies become tensors this process owns.

    Pool proxies are copied out and acknowledged (their chunks get recycled); with
    ``device_index`` every tensor ends up on that CUDA device.
    """
    if mm_inputs is None:
        return None

    def restore(value: Any) -> Any:
        if isinstance(value, CudaIpcTensorTransportProxy):
            return value.reconstruct_on_device(device_index)
        if isinstance(value, TransportProxyTensor):
            value = value.as_subclass(torch.Tensor)
        if isinstance(value, torch.Tensor) and device_index is not None:
            return value.to(torch.device("cuda", device_index))
        return value

    leaf = (CudaIpcTensorTransportProxy, torch.Tensor)
    return _walk(mm_inputs, lambda value: isinstance(value, leaf), restore)
