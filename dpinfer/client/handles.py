"""What ``AsyncInferenceClient`` hands back for a request: a ``RequestFuture`` or a ``RequestStream``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dpinfer.outputs import GenerationResult, StreamDelta


class RequestFuture(asyncio.Future[GenerationResult]):
    """The future of one request; ``request_id`` is what ``abort_request`` takes."""

    request_id: int


class RequestStream(AsyncIterator[StreamDelta]):
    """An async iterator of one streamed request's deltas; the last has ``finished=True``."""

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finished
        return item
