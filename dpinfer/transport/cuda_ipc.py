"""``TransportProxyTensor``: the ``cuda_ipc`` tensor transport (a CUDA tensor pickled as a handle).

``TensorEncoder`` (``codec``) wraps each CUDA tensor it meets in ``cuda_ipc`` mode; the receiver
unpickles an ordinary ``torch.Tensor`` that maps the very same device memory (no copy).
Simple and copy-free, but PyTorch keeps the exported allocation alive until the SENDER EXITS:
every exported tensor's memory stays pinned, so a long-running service leaks device memory.
Prefer ``cuda_ipc_pool`` (``mm_pool`` owns that journey) there.

Importing this module never needs CUDA; the CUDA work happens when a CUDA tensor is pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import SupportsIndex

import torch


class TransportProxyTensor(torch.Tensor):
    """A tensor whose pickle carries a CUDA IPC handle instead of its data.

    The receiver maps the very same device memory (no copy). Caveat: the allocation stays
    pinned until the sender process exits, even after both sides dropped the tensor. A CPU
    tensor pickles normally.
    """

    @staticmethod
    def wrap(tensor: torch.Tensor) -> TransportProxyTensor:
        return tensor.as_subclass(TransportProxyTensor)

    def __reduce_ex__(self, proto: SupportsIndex) -> str | tuple[Callable[..., object], tuple[object, ...]]:
        plain = self.as_subclass(torch.Tensor)
        if not plain.is_cuda:
            return plain.__reduce_ex__(proto)
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(plain.detach())
