"""``InferenceClient``: the blocking SDK. One DEALER socket, no sleeps.

Every call sends its messages and then blocks in ``zmq.Poller.poll`` (on the socket and its
monitor) until the answer is complete, a deadline passes (``RequestTimeoutError``) or the
connection is gone for good (``ConnectionLostError``; a lost coordinator is first
reconnected to and what was in flight resubmitted, see ``session.py``). A request at
concurrency 1 costs one send, one poll wake-up and one receive. Between calls, one daemon
thread sends the keepalive hellos (under the socket's lock, only while no call holds it), so
an idle client keeps its lease. The client is not thread-safe: use one per thread, or
``AsyncInferenceClient`` for concurrency inside one thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import zmq

from dpinfer import protocol as p
from dpinfer.client.connection import MONITOR_EVENTS, connect_dealer, monitor_event, timeout_message
from dpinfer.client.inputs import (
    ImageInput,
    Prompt,
    SamplingInput,
    as_prompt_list,
    as_sampling_list,
    completion_bodies,
)
from dpinfer.client.session import ClientSession, ControlAcknowledgement, check_acknowledgement, service_error
from dpinfer.config import default_address
from dpinfer.errors import ConnectionLostError, RequestTimeoutError, ServiceError
from dpinfer.outputs import GenerationResult, StreamDelta
from dpinfer.protocol.codec import Frame

DEFAULT_TIMEOUT_S = 60.0
_NO_REPLY = object()


class InferenceClient(ClientSession):
    """Blocking client of a dpinfer coordinator; also a context manager.

    ``timeout_s`` bounds the handshake (made in the constructor) and every control or status
    call; ``request_timeout_s`` bounds each ``generate``/``generate_stream`` call (None: no
    limit, a lost coordinator is still detected). A request the service fails comes back as a
    ``GenerationResult`` with ``finish_reason="error"`` and ``error`` set, not as an
    exception; exceptions mean the call itself failed (timeout, lost connection, refused
    control signal). ``reconnect`` (on by default) rides out a lost coordinator for up to
    ``reconnect_window_s``: calls see latency, not errors, if one answers again in time.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        request_timeout_s: float | None = None,
        curve_dir: str | None = None,
        client_name: str = "dpinfer-client",
        reconnect: bool = True,
        reconnect_window_s: float = 30.0,
    ) -> None:
        super().__init__(address or default_address(), client_name, reconnect, reconnect_window_s)
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = connect_dealer(self._ctx, self.address, curve_dir, self.identity)
        self._lock = threading.RLock()
        """Held by whoever uses the socket: a call, or the keepalive thread between calls."""
        self._stop_keepalive = threading.Event()
        self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._results: dict[int, GenerationResult] = {}
        self._deltas: dict[int, deque[StreamDelta]] = {}
        self._replies: dict[int, Any] = {}
        self._error: ServiceError | None = None
        self._closed = False
        try:
            self._sock.send_multipart(self.hello_frames())
            self._wait(lambda: self.hello is not None, timeout_s, timeout_message(self.address, timeout_s))
        except BaseException:
            self.close()
            raise
        self._keepalive = threading.Thread(target=self._keepalive_loop, name="dpinfer-keepalive", daemon=True)
        self._keepalive.start()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingInput | Sequence[SamplingInput] = None,
        *,
        rank: int | None = None,
        timeout_s: float | None = None,
    ) -> list[GenerationResult]:
        """Generate for one prompt or a list of prompts; results come back in input order.

        A prompt is a str, a list of token ids, or a map with ``prompt`` (or chat ``messages``)
        and optional ``images``. ``sampling_params`` is one value for all prompts or a list
        with one per prompt. With ``SamplingParams(n=K)`` a prompt gives K consecutive results,
        its completions (``GenerationResult.index`` 0..K-1; the rank prefills the prompt
        once). ``rank`` pins every request to one engine rank. ``timeout_s`` overrides
        ``request_timeout_s``; on timeout the requests are aborted.
        """
        prompt_list = as_prompt_list(prompts)
        sampling = as_sampling_list(sampling_params, len(prompt_list))
        bodies = [b for pr, sp in zip(prompt_list, sampling, strict=True) for b in completion_bodies(pr, sp)]
        entries = self._submit(bodies, stream=False, rank=rank)
        ids = [e.client_request_id for e in entries]
        budget = self.request_timeout_s if timeout_s is None else timeout_s
        results = self._results
        try:
            self._wait(lambda: all(i in results for i in ids), budget, f"{len(ids)} request(s) unfinished")
        except BaseException:  # timeout, lost connection, Ctrl-C: stop tracking (and abort) the rest
            self._abandon([i for i in ids if i not in results])
            raise
        finally:
            done = [results.pop(i) for i in ids if i in results]
        return done

    def generate_stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingInput = None,
        *,
        images: Sequence[ImageInput] | None = None,
        rank: int | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[StreamDelta]:
        """Stream one request: ``StreamDelta``s whose texts concatenate to the final text.

        The request is sent when iteration starts. The last delta has ``finished=True`` and
        carries the ``GenerationResult``. With ``SamplingParams(n=K)`` the K completions'
        deltas interleave (``StreamDelta.index`` says whose; each ends with its own finished
        delta) and the stream ends after the last. Leaving the loop early aborts what is
        unfinished. ``timeout_s`` bounds the wait for each delta.
        """
        bodies = completion_bodies(prompt, sampling_params, images)
        ids = [e.client_request_id for e in self._submit(bodies, stream=True, rank=rank)]
        queue: deque[StreamDelta] = deque()
        for request_id in ids:
            self._deltas[request_id] = queue
        budget = self.request_timeout_s if timeout_s is None else timeout_s
        unfinished = set(ids)
        try:
            while unfinished:
                self._wait(lambda: bool(queue), budget, f"stream {ids[0]} sent nothing")
                while queue:
                    delta = queue.popleft()
                    if delta.finished:
                        unfinished.discard(delta.request_id)
                    yield delta
        finally:
            for request_id in ids:
                self._deltas.pop(request_id, None)
            if unfinished:
                self._abandon(sorted(unfinished))

    # ------------------------------------------------------------------ control

    def pause_engines(self) -> ControlAcknowledgement:
        """Stop scheduling on every rank; in-flight requests keep their KV cache. RUNNING -> PAUSED."""
        return self._control(p.Signal.PAUSE, {})

    def unpause_engines(self) -> ControlAcknowledgement:
        """PAUSED -> RUNNING."""
        return self._control(p.Signal.UNPAUSE, {})

    def suspend_engines(self) -> ControlAcknowledgement:
        """Release KV cache memory while paused (requests are recomputed later). PAUSED -> SUSPENDED."""
        return self._control(p.Signal.SUSPEND, {})

    def resume_engines(self) -> ControlAcknowledgement:
        """SUSPENDED -> PAUSED (then ``unpause_engines`` to run)."""
        return self._control(p.Signal.RESUME, {})

    def stop_engines(self, drain: bool = True, deadline_s: float = 30.0) -> ControlAcknowledgement:
        """Stop every rank: finish in-flight work for up to ``deadline_s`` (``drain``) or abort it."""
        return self._control(p.Signal.STOP, {"drain": drain, "deadline_s": float(deadline_s)}, deadline_s)

    def update_weights(self, path: str) -> ControlAcknowledgement:
        """Load new weights from ``path`` (a directory every rank can read) while PAUSED."""
        return self._control(p.Signal.UPDATE_WEIGHTS, {"path": str(path)})

    def status(self) -> dict[str, Any]:
        """The coordinator's status map: ``state``, ``ranks`` (one map each), ``totals``, counters."""
        query_id, frames = self.status_frames()
        return self._call(query_id, frames, self.timeout_s, resend=True)

    def _control(
        self, signal: p.Signal, args: dict[str, Any], extra_s: float = 0.0
    ) -> ControlAcknowledgement:
        control_id, frames = self.control_frames(signal, args)
        return check_acknowledgement(self._call(control_id, frames, self.timeout_s + extra_s))

    def _call(self, call_id: int, frames: list[Frame], timeout_s: float, resend: bool = False) -> Any:
        """Send (while reconnecting: at the reconnect) and wait; a status query in flight during
        an outage is sent again, a control signal fails (it may have been applied)."""
        self._check_usable()
        replies = self._replies
        replies[call_id] = _NO_REPLY  # a late reply to an abandoned call is dropped, not kept
        try:
            with self._lock:
                if self.call_started(call_id, frames, resend):
                    self._sock.send_multipart(frames)
                self._wait(lambda: replies[call_id] is not _NO_REPLY, timeout_s, "no reply")
        finally:
            reply = replies.pop(call_id)
            self.call_done(call_id)
        if isinstance(reply, ConnectionLostError):
            raise reply
        return reply

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Say goodbye and release the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_keepalive.set()
        keepalive = getattr(self, "_keepalive", None)
        if keepalive is not None:
            keepalive.join()
        if self.connected:
            try:
                self._sock.send_multipart(self.bye_frames(), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()
        # destroy, not term: term blocks forever if any message is still queued to a dead peer.
        self._ctx.destroy(linger=0)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_ranks(self) -> int:
        """Ranks registered when the client connected."""
        return self.hello.num_ranks if self.hello else 0

    # ------------------------------------------------------------------ internals

    def _submit(self, bodies: list[bytes], stream: bool, rank: int | None) -> list[p.SubmitEntry]:
        self._check_usable()
        entries = [self.add(stream, rank, body) for body in bodies]
        with self._lock:
            if self.connected:  # else the resubmission at the reconnect sends them
                for frames in self.submit_messages(entries, bodies):
                    self._sock.send_multipart(frames)
        return entries

    def _send(self, frames: list[Frame]) -> None:
        with self._lock:
            try:
                self._sock.send_multipart(frames)
            except zmq.ZMQError as e:
                if not self._closed:
                    self.interrupted(f"cannot send to {self.address}: {e}")

    def _abandon(self, request_ids: list[int]) -> None:
        if request_ids and self.connected and not self._closed:
            self._send(self.abort_frames(request_ids))
        self.forget(request_ids)

    def _keepalive_loop(self) -> None:
        """Between calls, send the hellos that are due (a call in progress sends its own)."""
        stop = self._stop_keepalive
        while not stop.wait(min(5.0, max(0.1, self.seconds_to_tick(time.monotonic())))):
            if self._lock.acquire(blocking=False):
                try:
                    if not self._closed and self.tick(time.monotonic()):
                        self._send(self.hello_frames())
                finally:
                    self._lock.release()

    def _check_usable(self) -> None:
        if self._closed:
            raise ConnectionLostError("the client is closed")
        if self.lost_reason is not None:
            raise type(self.lost_error())(f"{self.lost_reason}; create a new client to reconnect")

    def _wait(self, done: Callable[[], bool], timeout_s: float | None, what: str) -> None:
        """Receive and dispatch until ``done()``; raise on timeout, lost connection or error reply.

        Also the timer: keepalive and reconnect hellos, and the end of the reconnect window.
        """
        with self._lock:
            self._wait_locked(done, timeout_s, what)

    def _wait_locked(self, done: Callable[[], bool], timeout_s: float | None, what: str) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sock, monitor = self._sock, self._monitor
        while not done():
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._check_usable()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise RequestTimeoutError(
                    what if self.hello is None else f"{what} after {timeout_s:g} s at {self.address}"
                )
            wait_s = self.seconds_to_tick(now) if self.hello is not None else None
            if deadline is not None:
                wait_s = deadline - now if wait_s is None else min(wait_s, deadline - now)
            events = dict(self._poller.poll(None if wait_s is None else int(wait_s * 1000) + 1))
            if monitor in events:
                reason = monitor_event(monitor.recv_multipart())
                if reason is not None:
                    self.interrupted(f"{reason} ({self.address})")
            if self.tick(time.monotonic()):
                self._send(self.hello_frames())
            if sock in events:
                self.dispatch(sock.recv_multipart())
                # Drain what else is queued; EVENTS is cheaper than raising zmq.Again per wake-up.
                while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    self.dispatch(sock.recv_multipart())

    # ------------------------------------------------------------------ session hooks

    def on_delta(self, delta: StreamDelta) -> None:
        queue = self._deltas.get(delta.request_id)
        if queue is not None:
            queue.append(delta)

    def on_result(self, result: GenerationResult, tail: StreamDelta | None) -> None:
        if tail is None:
            self._results[result.request_id] = result
            return
        queue = self._deltas.get(result.request_id)
        if queue is not None:
            queue.append(tail)

    def on_control(self, control_id: int, ack: ControlAcknowledgement) -> None:
        if control_id in self._replies:
            self._replies[control_id] = ack

    def on_status(self, query_id: int, status: dict[str, Any]) -> None:
        if query_id in self._replies:
            self._replies[query_id] = status

    def on_error(self, code: str, message: str) -> None:
        super().on_error(code, message)
        if self.hello is None:  # the handshake was refused (e.g. version_mismatch)
            self._error = service_error(code, message)

    def on_interrupted(self, reason: str, failed_calls: list[int]) -> None:
        self._send(self.hello_frames())
        error = ConnectionLostError(f"{reason}; a control signal in flight may or may not have been applied")
        for call_id in failed_calls:
            if call_id in self._replies:
                self._replies[call_id] = error

    def on_reconnected(self, messages: list[list[Frame]]) -> None:
        for frames in messages:
            self._send(frames)
