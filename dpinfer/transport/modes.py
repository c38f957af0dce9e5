"""The ``--transport`` registry: each mode and the tensor routes its two channel ends use.

Adding a mode means one ``Mode`` entry here (and its value in ``config.TransportMode``); the
channel (``channel.make_sender`` / ``make_receiver``) looks the mode up and never branches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpinfer.config import TransportConfig, TransportMode
from dpinfer.errors import TransportError

if TYPE_CHECKING:
    from dpinfer.transport.codec import TensorRoute
    from dpinfer.transport.tensor_queue import TensorQueue


@dataclass(frozen=True)
class RouteArgs:
    config: TransportConfig
    address: str
    deployment_id: str
    rank: int
    tensor_queue: TensorQueue | None


@dataclass(frozen=True)
class Mode:
    """One ``--transport`` mode: the tensor route each end of the channel uses (None: inline)."""

    sender: Callable[[RouteArgs], TensorRoute | None]
    receiver: Callable[[RouteArgs], TensorRoute | None]


def _no_route(_: RouteArgs) -> None:
    return None


def _shm_sender(a: RouteArgs) -> TensorRoute:
    from dpinfer.transport.shm_route import ShmSenderRoute, region_name

    return ShmSenderRoute(region_name(a.deployment_id, a.rank, a.address), a.config.shm_wait_s)


def _shm_receiver(a: RouteArgs) -> TensorRoute:
    from dpinfer.transport.shm import cleanup_stale_segments
    from dpinfer.transport.shm_route import ShmReceiverRoute, region_name

    cleanup_stale_segments(a.deployment_id)
    name = region_name(a.deployment_id, a.rank, a.address)
    return ShmReceiverRoute(name, a.config.shm_region_bytes, a.config.shm_copy_out)


def _queue_sender(a: RouteArgs) -> TensorRoute:
    from dpinfer.transport.tensor_queue import QueueSenderRoute

    return QueueSenderRoute(_require_queue(a.tensor_queue), a.config.shm_wait_s)


def _queue_receiver(a: RouteArgs) -> TensorRoute:
    from dpinfer.transport.tensor_queue import QueueReceiverRoute

    return QueueReceiverRoute(_require_queue(a.tensor_queue), a.config.shm_wait_s)


MODES: dict[TransportMode, Mode] = {
    TransportMode.ZMQ: Mode(_no_route, _no_route),
    TransportMode.SHM: Mode(_shm_sender, _shm_receiver),
    TransportMode.TENSOR_QUEUE: Mode(_queue_sender, _queue_receiver),
}
"""Every ``--transport`` mode and its routes: the one place a new mode is added."""
assert set(MODES) == set(TransportMode), "every transport mode needs its routes"


def _require_queue(tensor_queue: TensorQueue | None) -> TensorQueue:
    if tensor_queue is None:
        raise TransportError(
            "transport 'tensor_queue' needs the queue from make_tensor_queue(), created in the "
            "parent and passed to both ends as tensor_queue="
        )
    return tensor_queue
