"""``/health``, ``/version``, ``/metrics`` (no key) and the control endpoints (admin key).

Control endpoints, in the style of vLLM and SGLang, each answering the coordinator's
acknowledgement as JSON (``signal``, ``state``, ``ok``, ``error``, ``acks`` per rank):

- ``POST /pause``: ranks stop scheduling; requests keep their KV and wait.
- ``POST /unpause``: resume scheduling.
- ``POST /suspend``: (from paused) also release the KV cache memory.
- ``POST /resume``: (from suspended) take the memory back; the deployment is paused again.
- ``POST /update_weights`` with ``{"path": DIR}``: (while paused) load new weights on every rank.
- ``GET`` or ``POST /status``: the coordinator's status map (what ``dpinfer status --json`` shows).

A transition the deployment's state does not allow is a 409 whose message names the state.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.client.session import ControlError
from dpinfer.errors import DpinferError
from dpinfer.http.auth import Keys
from dpinfer.http.config import HttpConfig
from dpinfer.http.config import version as dpinfer_version
from dpinfer.http.connection import read_body
from dpinfer.http.decoding import decode
from dpinfer.http.errors import APIError, unavailable
from dpinfer.http.link import CoordinatorLink
from dpinfer.http.render import encode_json
from dpinfer.http.schemas import UpdateWeightsRequest
from dpinfer.protocol import ControlAcknowledgement

JSON = "application/json"
HEALTH_TIMEOUT_S = 2.0
_SIGNAL_CALLS: dict[str, Callable[[AsyncInferenceClient], Awaitable[ControlAcknowledgement]]] = {
    "pause": AsyncInferenceClient.pause_engines,
    "unpause": AsyncInferenceClient.unpause_engines,
    "suspend": AsyncInferenceClient.suspend_engines,
    "resume": AsyncInferenceClient.resume_engines,
}
SIGNALS = tuple(_SIGNAL_CALLS)


class ControlRoutes:
    def __init__(self, config: HttpConfig, link: CoordinatorLink, keys: Keys) -> None:
        self.config = config
        self.link = link
        self.keys = keys

    async def health(self, request: Request) -> Response:
        """200 when at least one rank serves, else 503 (with the reason)."""
        try:
            await asyncio.wait_for(self.link.status(), HEALTH_TIMEOUT_S)
            self.link.require()
        except TimeoutError:
            raise unavailable(f"the coordinator did not answer within {HEALTH_TIMEOUT_S:g} s") from None
        return Response(
            encode_json({"status": "ok", "live_ranks": self.link.live_ranks, "state": self.link.state}),
            media_type=JSON,
        )

    async def version(self, request: Request) -> Response:
        return Response(encode_json({"version": dpinfer_version()}), media_type=JSON)

    async def metrics(self, request: Request) -> Response:
        try:
            metrics = importlib.import_module("dpinfer.http.metrics")
        except ImportError:
            raise unavailable("metrics are not available in this build") from None
        status = await self.link.status()
        return Response(metrics.render_metrics(status), media_type=metrics.CONTENT_TYPE)

    async def status(self, request: Request) -> Response:
        self.keys.check_admin(request)
        return Response(encode_json(await self.link.status()), media_type=JSON)

    def signal(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            self.keys.check_admin(request)
            return await _acknowledged(_SIGNAL_CALLS[name](self._client()))

        endpoint.__name__ = name
        endpoint.__doc__ = f"{name.capitalize()} every rank (admin key)."
        return endpoint

    async def update_weights(self, request: Request) -> Response:
        """Load new weights from a checkpoint directory on every rank (while paused; admin key)."""
        self.keys.check_admin(request)
        req = decode(await read_body(request, self.config.max_body_bytes), UpdateWeightsRequest)
        if not req.path:
            raise APIError(400, "path must be a non-empty directory name", param="path")
        return await _acknowledged(self._client().update_weights(req.path))

    def _client(self) -> AsyncInferenceClient:
        client = self.link.client
        if client is None:
            raise unavailable(self.link.reason)
        return client


async def _acknowledged(call: Awaitable[ControlAcknowledgement]) -> Response:
    try:
        ack = await call
    except ControlError as e:
        raise APIError(409, str(e), code="invalid_state") from None
    except DpinferError as e:
        raise unavailable(f"the control signal got no answer: {e}") from None
    return Response(encode_json(_ack_json(ack)), media_type=JSON)


def _ack_json(ack: ControlAcknowledgement) -> dict[str, object]:
    return {
        "signal": ack.signal, "state": str(ack.state), "ok": ack.ok, "error": ack.error,
        "acks": [{"rank": a.rank, "ok": a.ok, "state": str(a.state), "error": a.error} for a in ack.acks],
    }  # fmt: skip
