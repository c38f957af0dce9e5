"""The chaos workload: requests whose right answer is known, and how each one ended.

A fixed pool of greedy and seeded sampled requests is run once, undisturbed, before any fault
(``reference_pass``); during the faults each slot of the workload draws from the same pool
(streamed or not, at random) and keeps one request in flight. Every request gets a
``RequestRecord``; ``ObservedClient`` also counts the final outputs it receives *on the wire*
for each of its request ids, before the SDK session decides what to deliver, so a second
final (or one for an id it never sent) is seen even though the SDK would drop it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dpinfer import protocol as p
from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.client.handles import RequestStream
from dpinfer.errors import ConnectionLostError, DpinferError, ProtocolError
from dpinfer.log import get_logger
from dpinfer.outputs import GenerationResult
from dpinfer.protocol.codec import Frame
from dpinfer.sampling import SamplingParams

logger = get_logger(__name__)

GREEDY, SAMPLED, FLOOD = "greedy", "sampled", "flood"
GRACE_S = 10.0
"""How long past its deadline a request is still waited for before it counts as never ended."""
DUPLICATE_REQUEST = "duplicate_request"
CONNECTION_LOST = "connection_lost"
"""The error code a record gets when the SDK failed it with ``ConnectionLostError``."""


@dataclass(frozen=True)
class RequestSpec:
    kind: str
    prompt: str
    max_new_tokens: int
    seed: int | None = None

    def sampling(self) -> SamplingParams:
        if self.kind == SAMPLED:
            return SamplingParams(
                max_new_tokens=self.max_new_tokens,
                temperature=0.9,
                top_p=0.95,
                seed=self.seed,
                ignore_eos=True,
            )
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class Reference:
    text: str
    token_ids: tuple[int, ...]


@dataclass
class RequestRecord:
    spec: RequestSpec
    stream: bool
    deadline_s: float
    submitted_at: float = field(default_factory=time.monotonic)
    client_name: str = ""
    request_id: int = -1
    finals: int = 0
    """Times the SDK ended this request (a result, or an exception)."""
    wire_finals: int = 0
    """Final outputs (or request errors) for its id that reached the client's socket."""
    latency_s: float | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error: str | None = None
    text: str = ""
    token_ids: tuple[int, ...] = ()
    streamed_text: list[str] = field(default_factory=list)
    streamed_token_ids: list[int] = field(default_factory=list)
    rank: int = -1
    aborted_by_harness: bool = False

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length")

    def end(self, result: GenerationResult) -> None:
        self.finals += 1
        self.latency_s = time.monotonic() - self.submitted_at
        self.finish_reason = result.finish_reason
        self.error_code = result.error_code
        self.error = result.error
        self.text, self.token_ids, self.rank = result.text, result.token_ids, result.rank

    def end_error(self, code: str, message: str) -> None:
        self.finals += 1
        self.latency_s = time.monotonic() - self.submitted_at
        self.finish_reason, self.error_code, self.error = "error", code, message


class ObservedClient(AsyncInferenceClient):
    """An SDK client that also counts, per request id, the finals its socket received."""

    def __init__(self, address: str, name: str, timeout_s: float = 5.0) -> None:
        super().__init__(address, timeout_s=timeout_s, client_name=name)
        self.records: dict[int, RequestRecord] = {}
        self.foreign_finals = 0
        """Finals for request ids this client never sent (misdelivered)."""

    def dispatch(self, frames: Sequence[Frame]) -> None:
        try:
            msg = p.decode(frames)
        except ProtocolError:
            msg = None
        if isinstance(msg, p.Outputs):
            for entry in msg.entries:
                if entry.final:
                    self._count_final(entry.client_request_id)
        elif (
            isinstance(msg, p.Error)
            and msg.client_request_id in self.records
            and msg.code != DUPLICATE_REQUEST
        ):
            self._count_final(
                msg.client_request_id
            )  # (a duplicate: a resubmission whose original still runs)
        super().dispatch(frames)

    def _count_final(self, request_id: int) -> None:
        record = self.records.get(request_id)
        if record is None:
            self.foreign_finals += 1
        else:
            record.wire_finals += 1


async def run_one(
    client: ObservedClient, spec: RequestSpec, stream: bool, deadline_s: float, records: list[RequestRecord]
) -> RequestRecord:
    """Submit one request (recorded in ``records`` once sent) and wait for its end, at most
    ``deadline_s + GRACE_S``."""
    record = RequestRecord(spec, stream, deadline_s, client_name=client.client_name)
    if stream:
        handle = client.add_request_streaming(spec.prompt, spec.sampling())
        record.request_id = handle.request_id
        client.records[record.request_id] = record
        waited = _follow_stream(handle, record)
    else:
        future = client.add_request(spec.prompt, spec.sampling())
        record.request_id = future.request_id
        client.records[record.request_id] = record
        waited = _await_future(future, record)
    records.append(record)
    try:
        await asyncio.wait_for(waited, deadline_s + GRACE_S)
    except TimeoutError:
        pass  # no final: the checks report it as never ended and past its deadline
    except ConnectionLostError as e:
        record.end_error(CONNECTION_LOST, str(e))
    except DpinferError as e:
        record.end_error(type(e).__name__, str(e))
    return record


async def _follow_stream(stream: RequestStream, record: RequestRecord) -> None:
    async for delta in stream:
        record.streamed_text.append(delta.text)
        record.streamed_token_ids.extend(delta.token_ids)
        if delta.finished and delta.result is not None:
            record.end(delta.result)


async def _await_future(future: asyncio.Future[GenerationResult], record: RequestRecord) -> None:
    record.end(await future)


def request_pool(seed: int, num_greedy: int = 12, num_sampled: int = 6) -> list[RequestSpec]:
    """The fixed pool every workload request is drawn from (its references come first)."""
    rng = random.Random(seed ^ 0x5EED)
    lengths = (32, 64, 96)
    greedy = [
        RequestSpec(GREEDY, f"chaos {i}: the quick brown fox jumps over the lazy dog", rng.choice(lengths))
        for i in range(num_greedy)
    ]
    sampled = [
        RequestSpec(SAMPLED, f"sampled {i}: once upon a time", rng.choice(lengths), seed=rng.getrandbits(32))
        for i in range(num_sampled)
    ]
    return greedy + sampled


class Workload:
    """Keeps ``concurrency`` pool requests in flight through one client, reconnecting when it is lost."""

    def __init__(self, address: str, pool: list[RequestSpec], deadline_s: float, seed: int) -> None:
        self.address = address
        self.pool = pool
        self.deadline_s = deadline_s
        self.records: list[RequestRecord] = []
        self.references: dict[RequestSpec, Reference] = {}
        self.clients: list[ObservedClient] = []
        self._rng = random.Random(seed)
        self._client: ObservedClient | None = None
        self._connecting = asyncio.Lock()

    async def client(self, timeout_s: float = 60.0) -> ObservedClient:
        """The live client, a new one if the last was lost (waiting for a restarted coordinator)."""
        async with self._connecting:
            if self._client is not None and self._client.lost_reason is None:
                return self._client
            if self._client is not None:
                await self._client.stop()
            deadline = time.monotonic() + timeout_s
            while True:
                client = ObservedClient(self.address, f"chaos-workload-{len(self.clients)}")
                try:
                    await client.start()
                    break
                except DpinferError:
                    if time.monotonic() > deadline:
                        raise
            self.clients.append(client)
            self._client = client
            return client

    async def reference_pass(self, concurrency: int) -> None:
        """Run the pool once with no fault; the results are the references."""
        queue = list(self.pool)

        async def worker() -> None:
            while queue:
                spec = queue.pop()
                record = await run_one(await self.client(), spec, False, self.deadline_s, [])
                if not record.ok:
                    raise DpinferError(f"the undisturbed reference request failed: {record.error}")
                self.references[spec] = Reference(record.text, record.token_ids)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def run(self, concurrency: int, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._slot(stop) for _ in range(concurrency)))

    async def _slot(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            spec = self._rng.choice(self.pool)
            stream = self._rng.random() < 0.5
            try:
                await run_one(await self.client(), spec, stream, self.deadline_s, self.records)
            except ConnectionLostError:
                continue  # lost before it was sent: nothing submitted, nothing to record
            except DpinferError as e:  # no coordinator to connect to: the fault outcome says why
                logger.warning("the workload could not reach the coordinator: %s", e)
                if not stop.is_set():
                    await asyncio.sleep(1.0)

    @property
    def num_dropped(self) -> int:
        return sum(c.num_dropped for c in self.clients)

    def sdk_counter(self, name: str) -> int | None:
        """The sum of an SDK counter (``num_resubmitted``...) over every client; None if the SDK has none."""
        values = [getattr(c, name) for c in self.clients if isinstance(getattr(c, name, None), int)]
        return sum(values) if values else None

    @property
    def foreign_finals(self) -> int:
        return sum(c.foreign_finals for c in self.clients)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.stop()
            self._client = None
