"""Pickle with tensor routing: the metadata travels pickled, each tensor by its own route.

This is the one implementation of every tensor transport mode. ``TensorEncoder`` pickles
any object with a ``dispatch_table`` entry for ``torch.Tensor`` (an ``nn.Parameter`` pickles
its ``.data``, which is routed too): the C pickler handles everything else at full speed,
and tensors nested anywhere (dicts, lists, tuples, ``BatchFeature``, dataclasses...) are
routed:

1. CUDA tensor and ``cuda_ipc``  -> ``TransportProxyTensor`` (``cuda_ipc``: a CUDA IPC handle)
2. ``cuda_ipc_pool`` and a pool for the tensor's device (the channel makes one per CUDA
   device) -> a ``MmItemMemoryPool`` chunk, pickled as a ``CudaIpcTensorTransportProxy``
   that the receiver copies out and acknowledges while unpickling; pool full -> step 3
3. smaller than ``inline_bytes`` -> pickled inline (latency-bound anyway; CUDA -> CPU)
4. a ``TensorRoute`` (shm region, tensor queue) -> a small handle; route full -> inline
5. otherwise                     -> pickled inline

``TensorDecoder`` resolves the handles through the same routes on the receiving side. Each
journey (allocate -> publish -> copy -> acknowledge -> recycle) is owned by one module:
``mm_pool`` for pool chunks (with ``ShmSyncBuffer`` counters), ``shm_region`` for the shm
region, ``tensor_queue`` for the queue. ``wrap_mm_inputs_for_ipc`` /
``unwrap_mm_inputs_from_ipc`` are this codec under the design's names, for one object
without a channel. Both ends live in one rank and talk over ``ipc://``; nothing here is
ever used on TCP.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
from collections.abc import Callable, Hashable
from typing import TypeAlias, TypeVar

import torch

from dpinfer.config import TensorTransportMode
from dpinfer.log import get_logger
from dpinfer.transport.cuda_ipc import TransportProxyTensor
from dpinfer.transport.mm_pool import CudaIpcTensorTransportProxy, MmItemMemoryPool

logger = get_logger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_THIS = __name__

RouteHandle: TypeAlias = Hashable
"""What a ``TensorRoute`` publishes in place of a tensor; opaque to the codec."""
RoutedHandle: TypeAlias = tuple[str, RouteHandle]
"""A handle with the name of the route that resolves it."""
Reduced: TypeAlias = str | tuple[Callable[..., object], tuple[object, ...]]
"""A ``__reduce_ex__`` value: how pickle rebuilds an object."""
PoolFactory: TypeAlias = Callable[[torch.device], MmItemMemoryPool | None]
"""The ``cuda_ipc_pool`` pool for tensors on a device, or None to send them the CPU way."""

H = TypeVar("H")


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

    def publish(self, tensor: torch.Tensor) -> RouteHandle | None:
        raise NotImplementedError

    def abandon(self, handle: RouteHandle) -> None:
        """Release what ``handle`` holds when it will never be resolved (default: nothing)."""

    def resolve(self, handle: RouteHandle) -> torch.Tensor:
        raise NotImplementedError

    def begin_message(self) -> None:
        """Called before each encoded message (routes that number messages use it)."""

    def close(self) -> None:
        """Release this end's resources (default: nothing)."""

    def stats(self) -> dict[str, int]:
        """Route-specific counters (default: none)."""
        return {}


def expect_handle(handle: RouteHandle, kind: type[H]) -> H:
    """``handle`` as a route's own handle type; any other value fails the message, not the loop."""
    if not isinstance(handle, kind):
        raise pickle.UnpicklingError(f"expected a {kind.__name__} tensor handle, got {type(handle).__name__}")
    return handle


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
        pool_factory: PoolFactory | None = None,
    ) -> None:
        self.inline_bytes = inline_bytes
        self.route = route
        self.tensor_transport = TensorTransportMode(tensor_transport)
        self._pool_factory = pool_factory
        self._pools: dict[torch.device, MmItemMemoryPool | None] = {}
        self._pools_lock = threading.Lock()
        self.num_routed = 0
        self.num_inline = 0
        self.num_fallbacks = 0
        self.num_cuda_ipc = 0
        self.num_pool = 0
        self.num_pool_full = 0

    def dumps(self, obj: object) -> tuple[bytes, list[RoutedHandle]]:
        """Pickle ``obj``; returns the bytes and the ``(route name, handle)`` pairs it reserved.

        Handles are hashable. Pass them to ``abandon`` if the bytes are never delivered.
        """
        handles: list[RoutedHandle] = []
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

    def abandon(self, handles: list[RoutedHandle]) -> None:
        if self.route is not None:
            for _name, handle in handles:
                self.route.abandon(handle)

    def _reducer(self, handles: list[RoutedHandle]) -> Callable[[torch.Tensor], Reduced]:
        def reduce(tensor: torch.Tensor) -> Reduced:
            if not _routable(tensor):
                self.num_inline += 1
                return tensor.__reduce_ex__(_PROTOCOL)
            plain = tensor.detach()
            if self.tensor_transport is not TensorTransportMode.DEFAULT:
                via_ipc = self._reduce_ipc(plain)
                if via_ipc is not None:
                    return via_ipc
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

    def _reduce_ipc(self, tensor: torch.Tensor) -> Reduced | None:
        """Steps 1 and 2 of the module docstring; None: the tensor takes the CPU path."""
        if self.tensor_transport is TensorTransportMode.CUDA_IPC:
            if not tensor.is_cuda:
                return None
            self.num_cuda_ipc += 1
            return TransportProxyTensor.wrap(tensor).__reduce_ex__(_PROTOCOL)
        pool = self._pool(tensor.device)
        if pool is None:
            return None
        proxy = CudaIpcTensorTransportProxy.publish(pool, tensor)
        if proxy is None:
            # Pool full: the CPU path below, never a raw (leaking) IPC export.
            self.num_pool_full += 1
            return None
        self.num_pool += 1
        return (_reconstruct_pool_proxy, (proxy,))

    def _pool(self, device: torch.device) -> MmItemMemoryPool | None:
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
            if pool is not None:
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


def _inline(tensor: torch.Tensor, nbytes: int) -> Reduced:
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

    def loads(self, data: bytes | memoryview, handles: list[RoutedHandle] | None = None) -> object:
        """Unpickle one message. ``handles`` lists every route handle the message holds; if
        decoding fails, the ones not yet resolved are given back so no slot leaks."""
        if not self.routes:
            return pickle.loads(data)  # reads the buffer in place (no BytesIO copy)
        resolved: set[RouteHandle] = set()
        try:
            return _Unpickler(io.BytesIO(data), self, resolved).load()
        except BaseException:
            for route_name, handle in handles or ():
                route = self.routes.get(route_name)
                if route is not None and handle not in resolved:
                    route.abandon(handle)
            raise

    def resolve(self, route_name: str, handle: RouteHandle, resolved: set[RouteHandle]) -> torch.Tensor:
        route = self.routes.get(route_name)
        if route is None:
            raise pickle.UnpicklingError(f"message uses tensor route {route_name!r}, not set up here")
        tensor = route.resolve(handle)
        resolved.add(handle)
        return tensor


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, decoder: TensorDecoder, resolved: set[RouteHandle]) -> None:
        super().__init__(file)
        # Not a bound method of self: the memo would hold it, making a cycle that keeps
        # every resolved tensor (and its shm slot) alive until the next GC pass.
        self._resolve = functools.partial(_resolve_with, decoder, resolved)

    def find_class(self, module: str, name: str) -> object:
        if module == _THIS and name == "_resolve_marker":
            return self._resolve
        return super().find_class(module, name)


def _resolve_with(
    decoder: TensorDecoder, resolved: set[RouteHandle], route_name: str, handle: RouteHandle
) -> torch.Tensor:
    return decoder.resolve(route_name, handle, resolved)


def _resolve_marker(route_name: str, handle: RouteHandle) -> torch.Tensor:
    raise pickle.UnpicklingError(
        f"a dpinfer {route_name!r} tensor handle can only be loaded by TensorDecoder"
    )


def _reconstruct_pool_proxy(proxy: CudaIpcTensorTransportProxy) -> torch.Tensor:
    return proxy.reconstruct_on_device()


def wrap_mm_inputs_for_ipc(
    mm_inputs: object,
    transport_mode: TensorTransportMode | str,
    pool: MmItemMemoryPool | None = None,
) -> bytes:
    """``mm_inputs`` encoded exactly as the request channel encodes it, tensors by ``transport_mode``.

    - ``default``: every tensor pickled inline (a CUDA tensor arrives on CPU).
    - ``cuda_ipc``: CUDA tensors become ``TransportProxyTensor`` handles.
    - ``cuda_ipc_pool``: tensors on ``pool.device`` are copied into ``pool`` and travel as
      ``CudaIpcTensorTransportProxy`` handles; when the pool is full they are pickled inline
      (never a raw IPC export) and the pool counts it in ``num_full``. The pool stays the
      caller's: nothing here shuts it down.
    """
    mode = TensorTransportMode(transport_mode)
    if mode is TensorTransportMode.CUDA_IPC_POOL and pool is None:
        raise ValueError("cuda_ipc_pool needs the sender's MmItemMemoryPool (pool=...)")

    def pool_for(device: torch.device) -> MmItemMemoryPool | None:
        return pool if pool is not None and device == pool.device else None

    payload, _no_route_handles = TensorEncoder(0, None, mode, pool_for).dumps(mm_inputs)
    return payload


def unwrap_mm_inputs_from_ipc(payload: bytes | memoryview) -> object:
    """Receiver side of ``wrap_mm_inputs_for_ipc``: every tensor becomes one this process holds.

    Pool chunks are copied out and acknowledged (so the sender recycles them) while unpickling.
    """
    return TensorDecoder().loads(payload)
