"""Server-sent events of a streamed completion: ``data: {chunk}`` per delta, then ``data: [DONE]``.

``first_event`` merges the choices' streams into one iterator of ``(index, delta)``;
``EventStream`` is the ASGI response that writes them: the role chunk of every chat choice
first, each delta's text, a finish chunk per choice, the usage chunk when asked, ``[DONE]``.
A choice that fails after the stream began ends it with an ``{"error": ...}`` event (as vLLM
does). Whatever ends the stream (done, error, client gone), every engine request still
running is aborted and the disconnect watch is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.client.handles import RequestStream
from dpinfer.errors import ConnectionLostError
from dpinfer.http.connection import DisconnectWatch, abort_soon
from dpinfer.http.errors import result_error, unavailable
from dpinfer.http.render import DONE, Reply, error_event
from dpinfer.outputs import GenerationResult, StreamDelta

Event = tuple[int, StreamDelta]
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def first_event(streams: Sequence[RequestStream]) -> AsyncGenerator[Event, None]:
    """Every choice's deltas as ``(index, delta)``, in arrival order."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1].finished:
                    break
    finally:
        for task in tasks:
            task.cancel()


class EventStream(Response):
    """The SSE response of one streamed request (its first event already received)."""

    def __init__(
        self, reply: Reply, include_usage: bool, n: int, num_choices: int, first: Event,
        events: AsyncGenerator[Event, None], watch: DisconnectWatch, client: AsyncInferenceClient,
        streams: Sequence[RequestStream], headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        # Response.__init__ would add a content-length; an event stream has none.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)
        for name, value in (headers or {}).items():
            self.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
        self._reply = reply
        self._include_usage = include_usage
        self._n = n
        self._num_choices = num_choices
        self._first = first
        self._events = events
        self._watch = watch
        self._client = client
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = self._reply.chunks(self._include_usage)
        results: list[GenerationResult | None] = [None] * self._num_choices
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            out = [writer.role(i) for i in range(self._num_choices)] if self._reply.chat else []
            item: Event | None = self._first
            while item is not None:
                index, delta = item
                if delta.text or delta.logprobs:
                    out.append(writer.text(index, delta.text, delta))
                if delta.finished:
                    result = delta.result
                    assert result is not None  # the last delta carries the result
                    if not result.ok:
                        out.append(error_event(result_error(result).body()))
                        break
                    out.append(writer.finish(index, result.finish_reason, result.stop_reason))
                    results[index] = result
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    out = []
                try:
                    item = await anext(self._events, None)
                except ConnectionLostError as e:
                    out.append(error_event(unavailable(f"lost the coordinator: {e}").body()))
                    break
            else:
                if self._include_usage:
                    out.append(writer.usage([r for r in results if r is not None], self._n))
            out.append(DONE)
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})
        finally:
            self._watch.close()
            await self._events.aclose()
            running = [s.request_id for s in self._streams if self._client.is_inflight(s.request_id)]
            abort_soon(self._client, running)
