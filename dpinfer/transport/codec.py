"""Pickle with tensor routing: the metadata travels pickled, each tensor by its own route.

``TensorEncoder`` pickles any object with a ``dispatch_table`` entry for ``torch.Tensor``
(an ``nn.Parameter`` pickles its ``.data``, which is routed too): the C pickler handles
everything else at full speed, and tensors nested anywhere (dicts, lists, tuples,
``BatchFeature``, dataclasses...) are routed:

1. CUDA tensor and ``cuda_ipc``       -> ``TransportProxyTensor`` (CUDA IPC handle)
2. CUDA tensor and ``cuda_ipc_pool``  -> a ``MmItemMemoryPool`` chunk; pool full -> step 3
3. smaller than ``inline_bytes``       -> pickled inline (latency-bound anyway; CUDA -> CPU)
4. a ``TensorRoute`` (shm region, tensor queue) -> a small handle; route full -> inline
5. otherwise                           -> pickled inline

``TensorDecoder`` resolves the handles through the same routes on the receiving side. Both
ends live in one rank and talk over ``ipc://``; nothing here is ever used on TCP.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch

from dpinfer.config import TensorTransportMode
from dpinfer.log import get_logger

logger = get_logger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_THIS = __name__


class TensorRoute:
    """A way to move one CPU (or GPU, copied to CPU) tensor out of band.

    ``publish`` returns a small picklable, hashable handle, or None when the route cannot take the
    tensor now (the encoder then pickles it inline and counts a fallback). ``abandon`` gives
    back what a handle reserved when its message is never sent. On the receiving side
    ``resolve`` turns a handle back into a tensor; it may raise, and the whole message is
    then dropped by the channel (counted), never the receiver loop.
    """

    name = "route"
    serial = False
    """True when messages must be encoded and sent one at a time (the route numbers them)."""

    def publish(self, tensor: torch.Tensor) -> Any | None:
        raise NotImplementedError

    def abandon(self, handle: Any) -> None:
        """Release what ``handle`` holds when it will never be resolved (default: nothing)."""

    def resolve(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

    def begin_message(self) -> None:
        """Called before each encoded message (routes that number messages use it)."""

    def close(self) -> None:
        """Release this end's resources (default: nothing)."""

    def stats(self) -> dict[str, int]:
        """Route-specific counters (default: none)."""
        return {}


def _routable(tensor: torch.Tensor) -> bool:
    on_known_device = tensor.device.type in ("cpu", "cuda")
    return tensor.layout == torch.strided and not tensor.is_quantized and on_known_device


class TensorEncoder:
    """Sender side. ``dumps`` is safe to call from several threads (each gets its own pickler)."""

    def __init__(
        self,
        inline_bytes: int,
        route: TensorRoute | None = None,
        tensor_transport: TensorTransportMode = TensorTransportMode.DEFAULT,
        pool_factory: Callable[[torch.device], Any] | None = None,
    ) -> None:
        self.inline_bytes = inline_bytes
        self.route = route
        self.tensor_transport = TensorTransportMode(tensor_transport)
        self._pool_factory = pool_factory
        self._pools: dict[torch.device, Any] = {}
        self._pools_lock = threading.Lock()
        self.num_routed = 0
        self.num_inline = 0
        self.num_fallbacks = 0
        self.num_cuda_ipc = 0
        self.num_pool = 0
        self.num_pool_full = 0

    def dumps(self, obj: Any) -> tuple[bytes, list[tuple[str, Any]]]:
        """Pickle ``obj``; returns the bytes and the ``(route name, handle)`` pairs it reserved.

        Handles are hashable. Pass them to ``abandon`` if the bytes are never delivered.
        """
        handles: list[tuple[str, Any]] = []
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=_PROTOCOL)
        reduce = self._reducer(handles)
        pickler.dispatch_table = {torch.Tensor: reduce}
        if self.route is not None:
            self.route.begin_message()
        try:
            pickler.dump(obj)
        except BaseException:
            self.abandon(handles)
            raise
        return buf.getvalue(), handles

    def abandon(self, handles: list[tuple[str, Any]]) -> None:
        if self.route is not None:
            for _name, handle in handles:
                self.route.abandon(handle)

    def _reducer(self, handles: list[tuple[str, Any]]) -> Callable[[torch.Tensor], Any]:
        def reduce(tensor: torch.Tensor) -> Any:
            if not _routable(tensor):
                self.num_inline += 1
                return tensor.__reduce_ex__(_PROTOCOL)
            plain = tensor.detach()
            if plain.is_cuda and self.tensor_transport is not TensorTransportMode.DEFAULT:
                via_gpu = self._reduce_cuda(plain)
                if via_gpu is not None:
                    return via_gpu
            nbytes = plain.numel() * plain.element_size()
            if self.route is not None and nbytes >= max(self.inline_bytes, 1):
                handle = self.route.publish(plain)
                if handle is not None:
                    handles.append((self.route.name, handle))
                    self.num_routed += 1
                    return (_resolve_marker, (self.route.name, handle))
                self.num_fallbacks += 1
            self.num_inline += 1
            return _inline(tensor, nbytes)

        return reduce

    def _reduce_cuda(self, tensor: torch.Tensor) -> Any | None:
        if self.tensor_transport is TensorTransportMode.CUDA_IPC:
            from dpinfer.transport.cuda_ipc import TransportProxyTensor

            self.num_cuda_ipc += 1
            return TransportProxyTensor.wrap(tensor).__reduce_ex__(_PROTOCOL)
        pool = self._pool(tensor.device)
        if pool is None:
            return None
        from dpinfer.transport.mm_pool import CudaIpcTensorTransportProxy

        proxy = CudaIpcTensorTransportProxy.publish(pool, tensor)
        if proxy is None:
            # Pool full: the CPU path below, never a raw (leaking) IPC export.
            self.num_pool_full += 1
            return None
        self.num_pool += 1
        return (_reconstruct_pool_proxy, (proxy,))

    def _pool(self, device: torch.device) -> Any | None:
        if self._pool_factory is None:
            return None
        with self._pools_lock:
            if device not in self._pools:
                self._pools[device] = self._pool_factory(device)
            return self._pools[device]

    def close(self) -> None:
        """Shut down the GPU pools this encoder made (their recyclers stop first)."""
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown()

    def stats(self) -> dict[str, int]:
        return {
            "num_routed": self.num_routed,
            "num_inline": self.num_inline,
            "num_fallbacks": self.num_fallbacks,
            "num_cuda_ipc": self.num_cuda_ipc,
            "num_pool": self.num_pool,
            "num_pool_full": self.num_pool_full,
            **(self.route.stats() if self.route is not None else {}),
        }


def _inline(tensor: torch.Tensor, nbytes: int) -> Any:
    """The ordinary pickle of ``tensor``, minus two surprises: a CUDA tensor arrives on CPU
    (as it would through the shm region), and a small view no longer drags its whole
    storage along (torch pickles the entire storage of a view)."""
    if tensor.requires_grad:
        return tensor.__reduce_ex__(_PROTOCOL)
    if tensor.is_cuda:
        tensor = tensor.cpu()
    elif tensor.untyped_storage().nbytes() > 2 * nbytes + 4096:
        tensor = tensor.clone()
    return tensor.__reduce_ex__(_PROTOCOL)


class TensorDecoder:
    """Receiver side: unpickles and resolves route handles through ``routes`` (by name)."""

    def __init__(self, routes: dict[str, TensorRoute] | None = None) -> None:
        self.routes = routes or {}

    def loads(self, data: bytes | memoryview, handles: list[tuple[str, Any]] | None = None) -> Any:
        """Unpickle one message. ``handles`` lists every route handle the message holds; if
        decoding fails, the ones not yet resolved are given back so no slot leaks."""
        if not self.routes:
            return pickle.loads(data)  # reads the buffer in place (no BytesIO copy)
        resolved: set[Any] = set()
        try:
            return _Unpickler(io.BytesIO(data), self, resolved).load()
        except BaseException:
            for route_name, handle in handles or ():
                route = self.routes.get(route_name)
                if route is not None and handle not in resolved:
                    route.abandon(handle)
            raise

    def resolve(self, route_name: str, handle: Any, resolved: set[Any]) -> torch.Tensor:
        route = self.routes.get(route_name)
        if route is None:
            raise pickle.UnpicklingError(f"message uses tensor route {route_name!r}, not set up here")
        tensor = route.resolve(handle)
        resolved.add(handle)
        return tensor


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, decoder: TensorDecoder, resolved: set[Any]) -> None:
        super().__init__(file)
        # Not a bound method of self: the memo would hold it, making a cycle that keeps
        # every resolved tensor (and its shm slot) alive until the next GC pass.
        self._resolve = functools.partial(_resolve_with, decoder, resolved)

    def find_class(self, module: str, name: str) -> Any:
        if module == _THIS and name == "_resolve_marker":
            return self._resolve
        return super().find_class(module, name)


def _resolve_with(decoder: TensorDecoder, resolved: set[Any], route_name: str, handle: Any) -> torch.Tensor:
    return decoder.resolve(route_name, handle, resolved)


def _resolve_marker(route_name: str, handle: Any) -> torch.Tensor:
    raise pickle.UnpicklingError(
        f"a dpinfer {route_name!r} tensor handle can only be loaded by TensorDecoder"
    )


def _reconstruct_pool_proxy(proxy: Any) -> torch.Tensor:
    return proxy.reconstruct_on_device()
