"""``CoordinatorLink``: one API worker's ``AsyncInferenceClient``, kept connected.

It connects at start-up and again whenever the connection is lost (coordinator restart,
network), and refreshes a small view of the deployment every ``status_interval_s``: how many
ranks serve and which model. A request is refused at once with 503 when there is no
connection or no live rank, instead of waiting in the coordinator's queue for a rank that may
never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.errors import DpinferError
from dpinfer.http.config import HttpConfig
from dpinfer.http.errors import APIError, unavailable
from dpinfer.log import get_logger

logger = get_logger(__name__)


class CoordinatorLink:
    def __init__(self, config: HttpConfig, client_name: str) -> None:
        self.config = config
        self.client_name = client_name
        self.client: AsyncInferenceClient | None = None
        """Set while connected."""
        self.live_ranks = 0
        self.models: tuple[str, ...] = ()
        """The model names the live ranks report, in rank order, without repeats."""
        self.state = "unknown"
        self.reason = f"the coordinator at {config.coordinator} is not connected yet"
        self.created = int(time.time())
        self._task: asyncio.Task[None] | None = None
        self._first_status = asyncio.Event()

    async def start(self) -> None:
        """Start keeping the link up; wait (at most ``timeout_s``) for the first status."""
        self._task = asyncio.create_task(self._run(), name="dpinfer-http-link")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_status.wait(), self.config.timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._drop("the HTTP front is stopping")

    def require(self) -> AsyncInferenceClient:
        """The client, if the deployment can serve a request now; else ``APIError(503)``."""
        client = self.client
        if client is None:
            raise unavailable(self.reason)
        if client.lost_reason is not None:
            raise unavailable(f"lost the coordinator: {client.lost_reason}")
        if self.live_ranks == 0:
            raise unavailable(f"no engine rank is serving (deployment state: {self.state})")
        return client

    def model_name(self, requested: str | None) -> str:
        """The name a request's ``model`` resolves to; 404 when it is not served here."""
        names = self.served_names
        if requested is None or requested in names:
            return requested or (names[0] if names else "unknown")
        served = ", ".join(names) or "none"
        raise APIError(
            404, f"the model {requested!r} does not exist (served: {served})", param="model",
            code="model_not_found",
        )  # fmt: skip

    @property
    def served_names(self) -> tuple[str, ...]:
        name = self.config.served_model_name
        return (name,) if name else self.models

    async def status(self) -> dict[str, Any]:
        """A fresh coordinator status (503 when it cannot be had)."""
        client = self.client
        if client is None:
            raise unavailable(self.reason)
        try:
            status = await client.status()
        except DpinferError as e:
            raise unavailable(f"the coordinator did not answer: {e}") from None
        self._observe(status)
        return status

    # ------------------------------------------------------------------ internals

    async def _run(self) -> None:
        interval = self.config.status_interval_s
        while True:
            if self.client is None or self.client.lost_reason is not None:
                await self._connect()
            if self.client is not None:
                try:
                    self._observe(await self.client.status())
                except DpinferError as e:
                    await self._drop(f"the coordinator at {self.config.coordinator} stopped answering: {e}")
            self._first_status.set()
            await asyncio.sleep(interval)  # a periodic refresh, not a wait for an event

    async def _connect(self) -> None:
        await self._drop(self.reason)
        client = AsyncInferenceClient(
            self.config.coordinator,
            timeout_s=self.config.timeout_s,
            curve_dir=self.config.curve_dir,
            client_name=self.client_name,
        )
        try:
            await client.start()
        except DpinferError as e:
            self.reason = f"the coordinator at {self.config.coordinator} is unreachable: {e}"
            return
        self.client = client
        logger.info("connected to the coordinator at %s", self.config.coordinator)

    async def _drop(self, reason: str) -> None:
        self.reason = reason
        self.live_ranks = 0
        client, self.client = self.client, None
        if client is not None:
            if client.lost_reason is not None:
                logger.warning("lost the coordinator: %s", client.lost_reason)
            await client.stop()

    def _observe(self, status: Mapping[str, object]) -> None:
        ranks = status.get("ranks")
        live = [r for r in ranks if isinstance(r, dict) and r.get("alive")] if isinstance(ranks, list) else []
        self.live_ranks = len(live)
        self.state = str(status.get("state", "unknown"))
        models = [str(r["model"]) for r in live if r.get("model")]
        if models:
            self.models = tuple(dict.fromkeys(models))
