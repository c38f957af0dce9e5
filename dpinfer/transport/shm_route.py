"""The ``shm`` channel's tensor route: both ends of ``ShmRegion`` seen as a ``TensorRoute``.

The receiver creates the region (it is up before any request flows and outlives the
senders it serves) and unlinks it at close; senders attach by name on their first large
tensor. A sender that outlives a killed receiver unlinks the orphaned region at close.
"""

from __future__ import annotations

import zlib

import torch

from dpinfer.config import shm_name
from dpinfer.log import get_logger
from dpinfer.transport.codec import RouteHandle, TensorRoute, expect_handle
from dpinfer.transport.shm import pid_alive, read_creator_pid
from dpinfer.transport.shm_region import RegionHandle, ShmRegion

logger = get_logger(__name__)


def region_name(deployment_id: str, rank: int, address: str) -> str:
    """The region of the channel at ``address`` (two channels of one rank never share one)."""
    return shm_name(deployment_id, rank, f"region-{zlib.crc32(address.encode()):08x}")


class ShmSenderRoute(TensorRoute):
    """Copies each large tensor into a slot of the receiver's region (bounded wait when full)."""

    name = "shm"

    def __init__(self, name: str, wait_s: float) -> None:
        self.region_name = name
        self.wait_s = wait_s
        self.region: ShmRegion | None = None
        self.num_no_region = 0
        self.starved = False

    def _attach(self) -> ShmRegion | None:
        if self.region is not None and not pid_alive(self.region.creator_pid()):
            # The receiver died; a restarted one makes a new region under the same name.
            self.close()
        if self.region is None:
            try:
                self.region = ShmRegion.attach(self.region_name)
            except (FileNotFoundError, ValueError):
                # The receiver is not up yet: this tensor goes inline, the next try attaches.
                self.num_no_region += 1
                return None
        return self.region

    def publish(self, tensor: torch.Tensor) -> RegionHandle | None:
        region = self._attach()
        if region is None:
            return None
        nbytes = tensor.numel() * tensor.element_size()
        if not region.fits(nbytes):
            return None
        # After one timed-out wait, do not wait again until a slot has been freed: a receiver
        # that holds its views costs the sender one bounded stall, not one per message.
        got = region.alloc(nbytes, 0.0 if self.starved else self.wait_s)
        self.starved = got is None
        if got is None:
            logger.debug("shm region %s full for %d bytes; pickling inline", region.name, nbytes)
            return None
        ticket, offset = got
        try:
            return region.write(ticket, offset, tensor)
        except BaseException:
            region.abandon(ticket)
            raise

    def abandon(self, handle: RouteHandle) -> None:
        handle = expect_handle(handle, RegionHandle)
        if self.region is not None and handle.incarnation == self.region.incarnation:
            self.region.abandon(handle.ticket)

    def stats(self) -> dict[str, int]:
        waits = self.region.num_waits if self.region is not None else 0
        return {"num_no_region": self.num_no_region, "num_region_waits": waits}

    def close(self) -> None:
        if self.region is None:
            return
        creator = self.region.creator_pid()
        # Unlink only the orphan itself, never a new region a restarted receiver put there.
        orphaned = not pid_alive(creator) and read_creator_pid(self.region_name) == creator
        if orphaned:
            logger.info("receiver of %s is gone; unlinking its region", self.region_name)
        self.region.close(unlink=orphaned)
        self.region = None


class ShmReceiverRoute(TensorRoute):
    """Owns the region; hands out views of slots (or copies, with ``copy_out``)."""

    name = "shm"

    def __init__(self, name: str, size_bytes: int, copy_out: bool = False) -> None:
        self.region = ShmRegion.create(name, size_bytes)
        self.copy_out = copy_out

    def resolve(self, handle: RouteHandle) -> torch.Tensor:
        return self.region.view(expect_handle(handle, RegionHandle), copy_out=self.copy_out)

    def abandon(self, handle: RouteHandle) -> None:
        handle = expect_handle(handle, RegionHandle)
        if handle.incarnation == self.region.incarnation and 0 <= handle.ticket < self.region.num_tickets:
            self.region.release(handle.ticket)

    def close(self) -> None:
        self.region.close(unlink=True)
