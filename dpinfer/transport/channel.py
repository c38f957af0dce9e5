"""The ordered request channel from the TokenizerProcess to the SchedulerProcess of one rank.

Everything the tokenizer sends to the scheduler (tokenized requests, aborts, control objects)
travels on ONE channel in send order, so an abort never overtakes its request. Objects are
arbitrary picklable Python values that may hold torch tensors nested in dicts, lists, tuples
and ``Mapping``s (``transformers.BatchFeature``). Both ends are local (``ipc://`` inside one
rank), so pickling is allowed here; nothing of this module ever listens on TCP.

Modes (``TransportConfig.transport``):

- ``zmq``: the whole object is pickled on a local ``ipc://`` PUSH/PULL socket.
- ``shm``: tensors of ``inline_bytes`` or more go through a pre-allocated shared-memory
  region; the socket carries pickled metadata with small handles (``shm_region``).
- ``tensor_queue``: metadata on the socket, tensors through a ``torch.multiprocessing``
  queue (``tensor_queue``); create it with ``make_tensor_queue`` in the parent and hand it
  to both ends (``tensor_queue=``) when spawning them.

In every mode CUDA tensors follow ``TransportConfig.tensor_transport`` (``codec``).

Tensors received in ``shm`` mode are views of the shared region (no copy); each holds its
slot until the last reference to it is dropped. A consumer that keeps tensors for long
should copy them (or set ``shm_copy_out``): a full region makes the sender wait once
(``shm_wait_s``) and then pickle inline, counted in ``stats()["num_fallbacks"]``.

Contract for both ends: the receiver binds ``address``, the sender connects (either may
start first). ``RequestReceiver.socket`` is a ZMQ socket that becomes readable whenever
``recv_ready`` may return something, so the scheduler registers it in its ``zmq.Poller``
and sleeps there when idle. ``recv_ready`` never blocks and never raises for one bad
message: an undecodable message is logged, counted in ``num_dropped`` and skipped.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from dpinfer.config import TensorTransportMode, TransportConfig, TransportMode
from dpinfer.errors import TransportError
from dpinfer.log import get_logger
from dpinfer.transport.modes import MODES, RouteArgs

if TYPE_CHECKING:
    import torch

    from dpinfer.transport.codec import PoolFactory, RoutedHandle, TensorDecoder, TensorEncoder, TensorRoute
    from dpinfer.transport.mm_pool import MmItemMemoryPool
    from dpinfer.transport.tensor_queue import TensorQueue

logger = get_logger(__name__)

# Each recv_ready call drains at most this many messages so one flood cannot starve a step.
MAX_DRAIN = 1024
ZERO_COPY_BYTES = 64 << 10


class RequestSender:
    """The TokenizerProcess end. ``send`` is ordered and never drops an object silently;
    it may be called from several threads (order is kept per thread)."""

    def send(self, obj: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> RequestSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RequestReceiver:
    """The SchedulerProcess end; poll ``socket`` for readability, then call ``recv_ready``."""

    socket: zmq.Socket
    num_dropped: int = 0

    def recv_ready(self) -> list[object]:
        """Return every object that has arrived (possibly none), in send order, without blocking."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> RequestReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket(context: zmq.Context | None, kind: int) -> tuple[zmq.Socket, bool]:
    owns = context is None
    ctx = zmq.Context() if context is None else context
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock, owns


class SocketRequestSender(RequestSender):
    """Encodes with a ``TensorEncoder`` and pushes ``[payload, handles?]`` on a local socket."""

    def __init__(
        self,
        address: str,
        encoder: TensorEncoder,
        context: zmq.Context | None = None,
        routes: tuple[TensorRoute, ...] = (),
    ) -> None:
        self.encoder = encoder
        self._routes = routes
        self.socket, self._owns_context = _socket(context, zmq.PUSH)
        # Let queued messages reach the peer on close; bounded so close never hangs.
        self.socket.setsockopt(zmq.LINGER, 5000)
        self.socket.connect(address)
        self._send_lock = threading.Lock()
        self._socket_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._closed = False

    def send(self, obj: object) -> None:
        if self._closed:
            raise TransportError("send on a closed RequestSender")
        if self.encoder.route is not None and self.encoder.route.serial:
            with self._send_lock:
                self._encode_and_send(obj)
            return
        # Encoding (tensor copies included) runs outside the lock so threads copy in parallel.
        self._encode_and_send(obj)

    def _encode_and_send(self, obj: object) -> None:
        payload, handles = self.encoder.dumps(obj)
        frames = [payload, pickle.dumps(handles, protocol=pickle.HIGHEST_PROTOCOL)] if handles else [payload]
        try:
            with self._socket_lock:
                # Zero-copy sends only pay off for big frames (inline tensors in zmq mode).
                self.socket.send_multipart(frames, copy=len(payload) < ZERO_COPY_BYTES)
        except BaseException:
            self.encoder.abandon(handles)
            raise

    def stats(self) -> dict[str, int]:
        return self.encoder.stats()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ctx = self.socket.context
        self.socket.close()
        if self._owns_context:
            ctx.term()
        self.encoder.close()
        for route in self._routes:
            route.close()


class SocketRequestReceiver(RequestReceiver):
    """Binds a local PULL socket; decodes with a ``TensorDecoder`` (local ``ipc://`` only)."""

    def __init__(
        self,
        address: str,
        decoder: TensorDecoder,
        context: zmq.Context | None = None,
        routes: tuple[TensorRoute, ...] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if not address.startswith("ipc://"):
            raise TransportError(f"the request channel is local only; expected ipc://, got {address}")
        self.decoder = decoder
        self._routes = routes
        self._on_close = on_close
        self.socket, self._owns_context = _socket(context, zmq.PULL)
        self.socket.bind(address)
        self._ipc_path, self._ipc_inode = ipc_path_identity(address)
        self.num_dropped = 0
        self._closed = False

    def recv_ready(self) -> list[object]:
        out: list[object] = []
        for _ in range(MAX_DRAIN):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            handles: list[RoutedHandle] | None = None
            try:
                if len(frames) > 1:
                    handles = pickle.loads(frames[1].buffer)
                out.append(self.decoder.loads(frames[0].buffer, handles))
            except Exception:  # one bad message must not stop the scheduler
                self.num_dropped += 1
                logger.exception("dropping an undecodable request-channel message")
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ctx = self.socket.context
        self.socket.close()
        if self._owns_context:
            ctx.term()
        remove_ipc_path(self._ipc_path, self._ipc_inode)
        for route in self._routes:
            route.close()
        if self._on_close is not None:
            self._on_close()


def ipc_path_identity(address: str) -> tuple[str, int]:
    """The file behind a bound ``ipc://`` address and its inode (0 if there is none)."""
    path = address.removeprefix("ipc://")
    try:
        return path, os.stat(path).st_ino
    except OSError:
        return path, 0


def remove_ipc_path(path: str, inode: int) -> None:
    """Remove the socket file we bound (libzmq leaves it), unless someone has re-bound it since."""
    try:
        if inode and os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def _pool_factory(config: TransportConfig, deployment_id: str, rank: int) -> PoolFactory | None:
    """One ``MmItemMemoryPool`` per CUDA device in ``cuda_ipc_pool`` mode; CPU tensors take the CPU path."""
    if TensorTransportMode(config.tensor_transport) is not TensorTransportMode.CUDA_IPC_POOL:
        return None

    def factory(device: torch.device) -> MmItemMemoryPool | None:
        from dpinfer.transport.mm_pool import MmItemMemoryPool

        if device.type != "cuda":
            return None
        return MmItemMemoryPool.for_device(config.cuda_pool_bytes, device, deployment_id, rank)

    return factory


def make_sender(
    config: TransportConfig,
    address: str,
    deployment_id: str,
    rank: int,
    context: zmq.Context | None = None,
    tensor_queue: TensorQueue | None = None,
) -> RequestSender:
    """The TokenizerProcess end of the channel selected by ``config.transport``.

    ``tensor_queue`` (only for ``tensor_queue`` mode) is the queue from ``make_tensor_queue``.
    """
    from dpinfer.transport.codec import TensorEncoder

    route = MODES[TransportMode(config.transport)].sender(
        RouteArgs(config, address, deployment_id, rank, tensor_queue)
    )
    encoder = TensorEncoder(
        config.inline_bytes, route, config.tensor_transport, _pool_factory(config, deployment_id, rank)
    )
    return SocketRequestSender(address, encoder, context, routes=(route,) if route else ())


def make_receiver(
    config: TransportConfig,
    address: str,
    deployment_id: str,
    rank: int,
    context: zmq.Context | None = None,
    tensor_queue: TensorQueue | None = None,
) -> RequestReceiver:
    """The SchedulerProcess end of the channel selected by ``config.transport``.

    In ``shm`` mode this creates the region (and removes one a dead process left under the
    same name); ``close`` unlinks it and any segment of this deployment whose creator died.
    """
    from dpinfer.transport.codec import TensorDecoder
    from dpinfer.transport.shm import cleanup_stale_segments

    mode = TransportMode(config.transport)
    pooled = TensorTransportMode(config.tensor_transport) is TensorTransportMode.CUDA_IPC_POOL

    def on_close() -> None:
        if pooled:
            from dpinfer.transport.mm_pool import close_opened_pools

            close_opened_pools()
        # Whatever a killed peer of this deployment left behind (live owners are kept).
        cleanup_stale_segments(deployment_id)

    route = MODES[mode].receiver(RouteArgs(config, address, deployment_id, rank, tensor_queue))
    decoder = TensorDecoder({route.name: route} if route else None)
    try:
        routes = (route,) if route else ()
        return SocketRequestReceiver(address, decoder, context, routes=routes, on_close=on_close)
    except BaseException:
        if route is not None:
            route.close()
        raise


def make_tensor_queue(config: TransportConfig) -> TensorQueue | None:
    """The ``torch.multiprocessing`` queue of ``tensor_queue`` mode, or None for other modes.

    Create it in the parent before spawning the tokenizer and scheduler and pass it to both.
    """
    if TransportMode(config.transport) is not TransportMode.TENSOR_QUEUE:
        return None
    from dpinfer.transport.tensor_queue import new_tensor_queue

    return new_tensor_queue()
