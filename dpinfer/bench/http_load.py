"""The load process of ``dpinfer bench http``: a lean HTTP/1.1 client and the SDK, on their own.

The HTTP client is callback-driven asyncio (uvloop where present): ``concurrency`` keep-alive
connections, each writing the one prebuilt request again the moment a response ends, so a
request costs no task, coroutine or header dict. It parses only the status line, the
``Content-Length`` or chunked framing and, when streaming, the SSE ``data:`` lines, whose
``choices[].text`` it decodes (msgspec) to count delta tokens (the null rank's text is ASCII,
one token per byte). ``sdk`` jobs send the same load through ``AsyncInferenceClient``. A job
runs in two steps so that the measured window holds only the load: the process connects and
answers ``ready``; the parent reads the CPU clocks and says ``go``; the result ends the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal, cast

import msgspec

from dpinfer.bench.report import process_cpu_s
from dpinfer.procutil import die_with_parent, set_process_name

_READY, _GO = "ready", "go"


@dataclass(frozen=True)
class Job:
    """One measured load: ``num_requests`` with ``concurrency`` in flight (1 and ``timed`` for latency)."""

    kind: Literal["http", "sdk"]
    target: str
    """``host:port`` of the HTTP front, or the coordinator's address for ``sdk``."""
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    num_requests: int
    concurrency: int
    timed: bool = False
    """Keep each request's latency (seconds from its send to its last byte)."""
    expected_tokens: int = 0
    """Streamed jobs: the tokens every request must deliver, or it counts as failed."""
    timeout_s: float = 60.0


@dataclass
class JobResult:
    elapsed_s: float = 0.0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    first_error: str = ""

    def fail(self, error: str, count: int = 1) -> None:
        self.failed += count
        if not self.first_error:
            self.first_error = error


def request_bytes(job: Job) -> bytes:
    """The raw ``POST /v1/completions`` every connection of ``job`` sends."""
    body = {"model": job.model, "prompt": job.prompt, "max_tokens": job.max_tokens}
    if job.stream:
        body["stream"] = True
    payload = msgspec.json.encode(body)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {job.target}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class _Choice(msgspec.Struct):
    text: str = ""


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: dict[str, object] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_HEAD, _BODY, _CHUNK = range(3)


class _Run:
    """One job's progress over all its connections."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.request = request_bytes(job)
        self.unsent = job.num_requests
        self.pending = job.num_requests
        self.result = JobResult()
        self.done = loop.create_future()

    def finish(self, tokens: int, error: str) -> None:
        if error:
            self.result.fail(error)
        else:
            self.result.ok += 1
            self.result.tokens += tokens
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)

    def abort(self, error: str) -> None:
        self.result.fail(error, self.pending)
        self.pending = self.unsent = 0
        if not self.done.done():
            self.done.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight, the next written as the last ends."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.events = bytearray()
        self.state = _HEAD
        self.need = self.status = self.tokens = 0  # body bytes, status code, tokens of this request
        self.saw_done = self.busy = False
        self.error = ""
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.busy = False
            self.run.abort(f"the server closed a connection mid-request ({exc or 'EOF'})")

    def send(self) -> None:
        run = self.run
        if run.unsent and self.transport is not None:
            run.unsent -= 1
            self.busy = True
            self.sent_at = time.perf_counter()
            self.transport.write(run.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:  # every branch returns when it needs more bytes
            if self.state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                self.status = int(head[9:12])
                if b"transfer-encoding: chunked" in head:
                    self.state = _CHUNK
                else:
                    at = head.find(b"content-length:") + 15
                    eol = head.find(b"\r\n", at)
                    self.need = int(head[at : eol if eol >= 0 else None])
                    self.state = _BODY
            elif self.state == _BODY:
                if len(buf) < self.need:
                    return
                body = bytes(buf[: self.need])
                del buf[: self.need]
                self._end(f"HTTP {self.status}: {body[:300]!r}" if self.status != 200 else "")
            else:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(buf[:eol], 16)
                if len(buf) < eol + size + 4:  # the size line, the data, its CRLF (or the last CRLF)
                    return
                if size:
                    self._sse(buf[eol + 2 : eol + 2 + size])
                del buf[: eol + size + 4]
                if not size:
                    self._end_stream()

    def _sse(self, data: bytearray) -> None:
        events = self.events
        events += data
        start = 0
        while (end := events.find(b"\n\n", start)) >= 0:
            line = events[start:end]
            start = end + 2
            if line == b"data: [DONE]":
                self.saw_done = True
            elif line.startswith(b"data: "):
                chunk = _decode_chunk(line[6:])
                if chunk.error is not None and not self.error:
                    self.error = f"error event: {chunk.error}"
                for choice in chunk.choices:
                    self.tokens += len(choice.text)
        del events[:start]

    def _end_stream(self) -> None:
        error = self.error
        if self.status != 200:
            error = f"HTTP {self.status}"
        elif not error and not self.saw_done:
            error = "the stream ended without data: [DONE]"
        elif not error and self.tokens != self.run.job.expected_tokens:
            error = f"streamed {self.tokens} tokens, expected {self.run.job.expected_tokens}"
        self._end(error)

    def _end(self, error: str) -> None:
        run = self.run
        if run.job.timed:
            run.result.latencies_s.append(time.perf_counter() - self.sent_at)
        tokens = self.tokens
        self.state, self.tokens, self.saw_done, self.error, self.busy = _HEAD, 0, False, "", False
        self.events.clear()
        run.finish(tokens, error)
        self.send()


async def _http_job(job: Job, conn: Connection) -> JobResult:
    loop = asyncio.get_running_loop()
    run = _Run(job, loop)
    host, _, port = job.target.rpartition(":")
    pairs = await asyncio.gather(
        *(loop.create_connection(lambda: _Connection(run), host, int(port)) for _ in range(job.concurrency))
    )
    connections = [protocol for _, protocol in pairs]
    try:
        conn.send(_READY)
        conn.recv()  # go: the parent has read the CPU clocks
        start = time.perf_counter()
        for connection in connections:
            connection.send()
        try:
            await asyncio.wait_for(asyncio.shield(run.done), job.timeout_s)
        except TimeoutError:
            run.abort(f"no answer within {job.timeout_s:g} s")
        run.result.elapsed_s = time.perf_counter() - start
    finally:
        for transport, _ in pairs:
            transport.close()
    return run.result


async def _sdk_job(job: Job, conn: Connection) -> JobResult:
    from dpinfer.client.async_client import AsyncInferenceClient
    from dpinfer.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=job.max_tokens)
    result = JobResult()
    unsent = job.num_requests
    clock = time.perf_counter

    async with AsyncInferenceClient(job.target, timeout_s=10, client_name="dpinfer-bench-http") as client:

        async def one() -> None:
            sent_at, tokens, outcome = clock(), 0, None
            if job.stream:
                async for delta in client.add_request_streaming(job.prompt, sampling):
                    tokens += len(delta.token_ids)
                    outcome = delta.result
            else:
                outcome = await client.add_request(job.prompt, sampling)
            if job.timed:
                result.latencies_s.append(clock() - sent_at)
            if outcome is None or not outcome.ok:
                result.fail(f"request failed: {outcome.error if outcome else 'no result'}")
            elif job.stream and tokens != job.expected_tokens:
                result.fail(f"streamed {tokens} tokens, expected {job.expected_tokens}")
            else:
                result.ok += 1
                result.tokens += tokens

        async def worker() -> None:
            nonlocal unsent
            while unsent > 0:
                unsent -= 1
                await one()

        conn.send(_READY)
        conn.recv()
        start = clock()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(job.concurrency))), job.timeout_s)
        except TimeoutError:
            result.fail(f"no answer within {job.timeout_s:g} s", job.num_requests - result.ok - result.failed)
        result.elapsed_s = clock() - start
    return result


def _load_main(conn: Connection) -> None:
    """The load process: run each ``Job`` received until ``None``; the parent ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    die_with_parent()
    set_process_name("dpinfer-load")
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    while (job := conn.recv()) is not None:
        run = _http_job if job.kind == "http" else _sdk_job
        try:
            result = loop.run_until_complete(run(job, conn))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the benchmark
            result = JobResult()
            result.fail(f"the load process failed: {type(e).__name__}: {e}", job.num_requests)
        conn.send(result)
    loop.close()


@dataclass
class Tally:
    """Throughput rounds of one kind (requests or tokens) and the CPU seconds they cost."""

    rates: list[float] = field(default_factory=list)
    units: int = 0
    num_requests: int = 0
    """Every request of this kind that was measured (latency runs too)."""
    front_s: float = 0.0
    hub_s: float = 0.0
    load_s: float = 0.0

    def add(self, units: int, elapsed_s: float, cpu_s: list[float]) -> None:
        """One round; ``cpu_s`` is ``[*front workers, hub, load]``."""
        self.rates.append(units / elapsed_s if elapsed_s else 0.0)
        self.units += units
        self.front_s += sum(cpu_s[:-2])
        self.hub_s += cpu_s[-2]
        self.load_s += cpu_s[-1]

    def best(self) -> float | None:
        return round(max(self.rates), 1) if self.rates else None

    def us(self, cpu_s: float) -> float | None:
        return round(cpu_s / self.units * 1e6, 2) if self.units else None


class LoadProcess:
    """The parent's handle on the load process (spawned, daemonic, ended by ``close``)."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process: BaseProcess = ctx.Process(target=_load_main, args=(child,), name="dpinfer-load",
                                                daemon=True)  # fmt: skip
        self.process.start()
        child.close()
        assert self.process.pid is not None
        self.pid: int = self.process.pid
        self._busy = False

    def run(self, job: Job, pids: list[int]) -> tuple[JobResult, list[float]]:
        """Run ``job``; its result and the CPU seconds each of ``pids`` used while it ran."""
        self._busy = True
        self._conn.send(job)
        first = self._wait(job.timeout_s)
        if isinstance(first, JobResult):  # it failed before it was ready
            self._busy = False
            return first, [0.0] * len(pids)
        cpu0 = [process_cpu_s(pid) for pid in pids]
        self._conn.send(_GO)
        result = self._wait(job.timeout_s + 10)
        cpu = [process_cpu_s(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
        assert isinstance(result, JobResult)
        self._busy = False
        return result, cpu

    def _wait(self, timeout_s: float) -> JobResult | str:
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"the load process did not answer within {timeout_s:g} s")
        try:
            answer: JobResult | str = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the load process exited with code {self.process.exitcode}") from None
        return answer

    def close(self) -> None:
        """End the process: at once when interrupted mid-job, else after it leaves its loop."""
        if not self._busy:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
