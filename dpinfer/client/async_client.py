"""``AsyncInferenceClient``: the asyncio SDK for many requests in flight from one thread.

Receiving is event-driven: one task awaits the ``zmq.asyncio`` socket (and one its monitor),
so nothing sleeps or polls on a timer. Sending is batched: every request added during one
event-loop tick is queued and goes out in a single ``Submit`` when the loop next runs its
callbacks, so thousands of ``add_request`` calls cost a handful of messages.

A request the service fails resolves its future with a ``GenerationResult`` whose
``finish_reason`` is ``"error"``. A lost coordinator (``Notice(shutdown)``, a dropped
connection, a restart) is reconnected to and what was in flight is resubmitted (see
``session.py``); one task sends the keepalive hellos. Only when no coordinator answers within
``reconnect_window_s`` (at once with ``reconnect=False``) does every pending future and stream
fail with ``ConnectionLostError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from dpinfer import protocol as p
from dpinfer.client.connection import MONITOR_EVENTS, connect_dealer, monitor_event, timeout_message
from dpinfer.client.handles import RequestFuture, RequestStream
from dpinfer.client.inputs import ImageInput, Prompt, SamplingInput, completion_bodies, request_body, single
from dpinfer.client.session import ClientSession, ControlAcknowledgement, check_acknowledgement, service_error
from dpinfer.config import default_address
from dpinfer.errors import ConnectionLostError, RequestTimeoutError
from dpinfer.log import get_logger
from dpinfer.outputs import GenerationResult, StreamDelta
from dpinfer.protocol.codec import Frame

logger = get_logger(__name__)


class AsyncInferenceClient(ClientSession):
    """Asyncio client of a dpinfer coordinator; ``async with`` starts and stops it.

    ``timeout_s`` bounds ``start()`` (the handshake) and every control or status call.
    ``reconnect`` (on by default) rides out a lost coordinator for up to ``reconnect_window_s``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout_s: float = 60.0,
        curve_dir: str | None = None,
        client_name: str = "dpinfer-async-client",
        reconnect: bool = True,
        reconnect_window_s: float = 30.0,
    ) -> None:
        super().__init__(address or default_address(), client_name, reconnect, reconnect_window_s)
        self.timeout_s = timeout_s
        self._curve_dir = curve_dir
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: Any = None
        self._futures: dict[int, RequestFuture] = {}
        self._streams: dict[int, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._hello_waiter: asyncio.Future[None] | None = None
        self._wake_timer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox_entries: list[p.SubmitEntry] = []
        self._outbox_bodies: list[bytes] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and complete the handshake; ``RequestTimeoutError`` if nobody answers in ``timeout_s``."""
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._sock = connect_dealer(self._ctx, self.address, self._curve_dir, self.identity)
        monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        self._hello_waiter = self._loop.create_future()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="dpinfer-client-recv"),
            asyncio.create_task(self._monitor_loop(monitor), name="dpinfer-client-monitor"),
        ]
        self._sock.send_multipart(self.hello_frames())
        try:
            await asyncio.wait_for(self._hello_waiter, self.timeout_s)
        except TimeoutError:
            await self.stop()
            raise RequestTimeoutError(timeout_message(self.address, self.timeout_s)) from None
        except BaseException:
            await self.stop()
            raise
        finally:
            self._hello_waiter = None
        self._tasks.append(asyncio.create_task(self._timer_loop(), name="dpinfer-client-keepalive"))

    async def stop(self) -> None:
        """Fail whatever is pending with ``ConnectionLostError``, say goodbye, close the socket."""
        if self._stopped:
            return
        self._stopped = True
        if self._sock is None:
            return
        if self.connected:
            self._flush()
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(self.bye_frames())
        self.connection_lost("the client was stopped")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.disable_monitor()
        self._sock.close()
        assert self._ctx is not None
        self._ctx.term()

    async def __aenter__(self) -> AsyncInferenceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def num_ranks(self) -> int:
        return self.hello.num_ranks if self.hello else 0

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingInput = None,
        images: Sequence[ImageInput] | None = None,
        rank: int | None = None,
    ) -> RequestFuture:
        """Queue one request (sent with the others added in this loop tick); returns its future.

        The future resolves to a ``GenerationResult`` (``finish_reason="error"`` when the service
        failed the request) or fails with ``ConnectionLostError``. For ``n > 1`` use
        ``add_parallel_requests``.
        """
        return self._future(request_body(prompt, single(sampling_params, "add_request"), images), rank)

    def add_parallel_requests(
        self,
        prompt: Prompt,
        sampling_params: SamplingInput = None,
        images: Sequence[ImageInput] | None = None,
        rank: int | None = None,
    ) -> list[RequestFuture]:
        """Queue the ``SamplingParams.n`` completions of one prompt, sent together to one rank,
        which prefills the prompt once; one future per completion, in ``index`` order."""
        return [self._future(body, rank) for body in completion_bodies(prompt, sampling_params, images)]

    def _future(self, body: bytes, rank: int | None) -> RequestFuture:
        entry = self._enqueue(body, stream=False, rank=rank)
        assert self._loop is not None
        future = RequestFuture(loop=self._loop)
        future.request_id = entry.client_request_id
        self._futures[entry.client_request_id] = future
        return future

    def add_request_streaming(
        self,
        prompt: Prompt,
        sampling_params: SamplingInput = None,
        images: Sequence[ImageInput] | None = None,
        rank: int | None = None,
    ) -> RequestStream:
        """Queue one streamed request; iterate the returned stream with ``async for``. For
        ``n > 1`` use ``add_parallel_requests_streaming``."""
        sampling = single(sampling_params, "add_request_streaming")
        return self._stream(request_body(prompt, sampling, images), rank)

    def add_parallel_requests_streaming(
        self,
        prompt: Prompt,
        sampling_params: SamplingInput = None,
        images: Sequence[ImageInput] | None = None,
        rank: int | None = None,
    ) -> list[RequestStream]:
        """``add_parallel_requests``, streamed: one stream per completion, in ``index`` order."""
        return [self._stream(body, rank) for body in completion_bodies(prompt, sampling_params, images)]

    def _stream(self, body: bytes, rank: int | None) -> RequestStream:
        entry = self._enqueue(body, stream=True, rank=rank)
        stream = RequestStream(entry.client_request_id)
        self._streams[entry.client_request_id] = stream
        return stream

    async def abort_request(self, request_id: int) -> None:
        """Ask the service to abort a request; its future/stream then ends with ``finish_reason="abort"``.

        Unknown or finished ids are ignored.
        """
        if not self.is_inflight(request_id) or self._sock is None or self.lost_reason is not None:
            return
        frames = self.abort_frames([request_id])  # marked aborted: never resubmitted
        if self.connected:
            self._flush()  # the Submit must reach the coordinator before its Abort
            self._sock.send_multipart(frames)

    # ------------------------------------------------------------------ control

    async def pause_engines(self) -> ControlAcknowledgement:
        return await self._control(p.Signal.PAUSE, {})

    async def unpause_engines(self) -> ControlAcknowledgement:
        return await self._control(p.Signal.UNPAUSE, {})

    async def suspend_engines(self) -> ControlAcknowledgement:
        return await self._control(p.Signal.SUSPEND, {})

    async def resume_engines(self) -> ControlAcknowledgement:
        return await self._control(p.Signal.RESUME, {})

    async def stop_engines(self, drain: bool = True, deadline_s: float = 30.0) -> ControlAcknowledgement:
        args = {"drain": drain, "deadline_s": float(deadline_s)}
        return await self._control(p.Signal.STOP, args, deadline_s)

    async def update_weights(self, path: str) -> ControlAcknowledgement:
        return await self._control(p.Signal.UPDATE_WEIGHTS, {"path": str(path)})

    async def status(self) -> dict[str, Any]:
        query_id, frames = self.status_frames()
        return await self._call(query_id, frames, self.timeout_s, resend=True)

    async def _control(
        self, signal: p.Signal, args: dict[str, Any], extra_s: float = 0.0
    ) -> ControlAcknowledgement:
        control_id, frames = self.control_frames(signal, args)
        return check_acknowledgement(await self._call(control_id, frames, self.timeout_s + extra_s))

    async def _call(self, call_id: int, frames: list[Frame], timeout_s: float, resend: bool = False) -> Any:
        """Send (while reconnecting: at the reconnect) and await the reply; a status query in
        flight during an outage is sent again, a control signal fails (it may have been applied)."""
        self._check_usable()
        assert self._loop is not None
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = waiter
        if self.call_started(call_id, frames, resend):
            self._flush()
            self._sock.send_multipart(frames)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"no reply after {timeout_s:g} s at {self.address}") from None
        finally:
            self._calls.pop(call_id, None)
            self.call_done(call_id)

    # ------------------------------------------------------------------ internals

    def _check_usable(self) -> None:
        if self.lost_reason is not None:
            raise self.lost_error()
        if self.hello is None:
            raise ConnectionLostError("not connected: call `await client.start()` first")

    def _enqueue(self, body: bytes, stream: bool, rank: int | None) -> p.SubmitEntry:
        self._check_usable()
        entry = self.add(stream, rank, body)
        self._outbox_entries.append(entry)
        self._outbox_bodies.append(body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        return entry

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox_entries:
            return
        if not self.connected:  # each is in flight: the resubmission at the reconnect sends it
            self._outbox_entries, self._outbox_bodies = [], []
            return
        messages = self.submit_messages(self._outbox_entries, self._outbox_bodies)
        self._outbox_entries, self._outbox_bodies = [], []
        for frames in messages:
            self._sock.send_multipart(frames)

    async def _receive_loop(self) -> None:
        sock = self._sock
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as e:
                self.connection_lost(f"socket error: {e}")
                return
            self.dispatch(frames)

    async def _monitor_loop(self, monitor: Any) -> None:
        try:
            while True:
                reason = monitor_event(await monitor.recv_multipart())
                if reason is not None:
                    self.interrupted(f"{reason} ({self.address})")
        finally:
            monitor.close(linger=0)

    async def _timer_loop(self) -> None:
        """Keepalive hellos while connected, reconnect hellos and the window while not."""
        wake = self._wake_timer
        while self.lost_reason is None:
            if self.tick(time.monotonic()):
                self._send(self.hello_frames())
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.seconds_to_tick(time.monotonic()))

    def _send(self, frames: list[Frame]) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart(frames)

    # ------------------------------------------------------------------ session hooks

    def on_hello(self, msg: p.HelloAck) -> None:
        if self._hello_waiter is not None and not self._hello_waiter.done():
            self._hello_waiter.set_result(None)

    def on_delta(self, delta: StreamDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is not None:
            stream._queue.put_nowait(delta)

    def on_result(self, result: GenerationResult, tail: StreamDelta | None) -> None:
        if tail is not None:
            stream = self._streams.pop(result.request_id, None)
            if stream is not None:
                stream._queue.put_nowait(tail)
            return
        future = self._futures.pop(result.request_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def on_control(self, control_id: int, ack: ControlAcknowledgement) -> None:
        self._resolve_call(control_id, ack)

    def on_status(self, query_id: int, status: dict[str, Any]) -> None:
        self._resolve_call(query_id, status)

    def _resolve_call(self, call_id: int, value: Any) -> None:
        waiter = self._calls.get(call_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def on_error(self, code: str, message: str) -> None:
        super().on_error(code, message)
        if self._hello_waiter is not None and not self._hello_waiter.done():
            self._hello_waiter.set_exception(service_error(code, message))

    def on_interrupted(self, reason: str, failed_calls: list[int]) -> None:
        self._send(self.hello_frames())
        self._wake_timer.set()
        error = ConnectionLostError(f"{reason}; a control signal in flight may or may not have been applied")
        for call_id in failed_calls:
            waiter = self._calls.get(call_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)

    def on_reconnected(self, messages: list[list[Frame]]) -> None:
        self._outbox_entries, self._outbox_bodies = [], []  # the resubmission holds them
        for frames in messages:
            self._send(frames)

    def on_lost(self, reason: str) -> None:
        error = self.lost_error()
        self._wake_timer.set()
        if self._hello_waiter is not None and not self._hello_waiter.done():
            self._hello_waiter.set_exception(error)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        for stream in self._streams.values():
            stream._queue.put_nowait(error)
        for waiter in self._calls.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._futures.clear()
        self._streams.clear()
        self._outbox_entries, self._outbox_bodies = [], []
