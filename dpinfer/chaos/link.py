"""``StatusLink``: the harness's own status and control line to a coordinator that may die.

One ``AsyncInferenceClient`` that is replaced whenever its connection is lost, so a status
poll across a coordinator restart answers ``None`` (not there yet) instead of raising.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.errors import DpinferError
from dpinfer.log import get_logger

logger = get_logger(__name__)


class StatusLink:
    def __init__(self, address: str) -> None:
        self.address = address
        self._client: AsyncInferenceClient | None = None
        self._connecting = asyncio.Lock()
        """The monitor, the injector and the run share the link: one of them connects at a time
        (two replacing the lost client at once would leak one, which would keep its lease)."""

    async def _connected(self, timeout_s: float) -> AsyncInferenceClient | None:
        async with self._connecting:
            return await self._connect(timeout_s)

    async def _connect(self, timeout_s: float) -> AsyncInferenceClient | None:
        client = self._client
        if client is not None and client.lost_reason is None:
            return client
        await self.close()
        # No reconnect: a lost coordinator answers None at once, and the next call connects anew.
        client = AsyncInferenceClient(
            self.address, timeout_s=timeout_s, client_name="dpinfer-chaos-status", reconnect=False
        )
        try:
            await client.start()
        except DpinferError:
            return None
        self._client = client
        return client

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The coordinator's status map, or None if it does not answer within ``timeout_s``."""
        client = await self._connected(timeout_s)
        if client is None:
            return None
        try:
            return await client.status()
        except DpinferError:
            await self.close()
            return None

    async def stop_engines(self, deadline_s: float) -> bool:
        """STOP without draining (every request gets its final); False if that failed."""
        client = await self._connected(5.0)
        if client is None:
            return False
        try:
            await client.stop_engines(drain=False, deadline_s=deadline_s)
            return True
        except DpinferError as e:
            logger.warning("stopping the ranks through the coordinator failed: %s", e)
            return False

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()
