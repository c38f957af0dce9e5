"""One HTTP request's I/O: its body (bounded), its disconnect (aborts its engine requests).

``read_body`` refuses a body over the limit with 413 before reading it when the length is
declared, and as soon as it grows past the limit otherwise. ``DisconnectWatch`` waits on the
ASGI ``receive`` channel, which after the body yields only ``http.disconnect``: when the
client goes away mid-request or mid-stream, every engine request of that HTTP request is
aborted at once, so its rank frees the KV without waiting for the generation to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dpinfer.http.errors import APIError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import Message, Receive

    from dpinfer.client.async_client import AsyncInferenceClient

_background: set[asyncio.Task[None]] = set()


class ClientGone(APIError):
    """The client disconnected before its request was read; nobody reads the answer."""

    def __init__(self) -> None:
        super().__init__(400, "the client disconnected", code="client_disconnected")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (``APIError(413)`` beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    receive = request.receive
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class DisconnectWatch:
    """Abort ``request_ids`` on ``client`` if the HTTP client disconnects before ``close()``."""

    __slots__ = ("_client", "_request_ids", "_task", "disconnected")

    def __init__(self, receive: Receive, client: AsyncInferenceClient, request_ids: Iterable[int]) -> None:
        self._client = client
        self._request_ids = tuple(request_ids)
        self.disconnected = False
        self._task: asyncio.Future[Message] = asyncio.ensure_future(receive())
        self._task.add_done_callback(self._on_receive)

    def close(self) -> None:
        self._task.remove_done_callback(self._on_receive)
        self._task.cancel()

    def _on_receive(self, task: asyncio.Future[Message]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        if task.result()["type"] != "http.disconnect":
            return  # a pipelined request's bytes; not ours to read
        self.disconnected = True
        abort_soon(self._client, self._request_ids)


def abort_soon(client: AsyncInferenceClient, request_ids: Iterable[int]) -> None:
    """Abort each request (on the next loop turn; ids no longer in flight are ignored)."""
    for request_id in request_ids:
        abort = asyncio.ensure_future(client.abort_request(request_id))
        _background.add(abort)
        abort.add_done_callback(_background.discard)
