"""The SDK's lease and reconnect (issue 9, items 3 and 7): keepalives, a restarted coordinator
costing latency and not errors, exactly-once resubmission with stream continuation, the typed
error after the reconnect window, ``reconnect=False``, and clients that go silent or stop
reading being forgotten with their requests aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio
from wire import WireClient, rank_info

from dpinfer import protocol as p
from dpinfer.client import AsyncInferenceClient, InferenceClient, RequestStream
from dpinfer.client.connection import resumed_body
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator import server
from dpinfer.coordinator.process import CoordinatorHandle
from dpinfer.errors import ConnectionLostError, ReconnectTimeoutError
from dpinfer.outputs import StreamDelta
from dpinfer.protocol.bodies import RequestBody, Resume

pytestmark = pytest.mark.timeout(90)

Factory = Callable[..., Any]


def run(coro: Any, timeout_s: float = 40) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _wait_live(address: str, ranks: list[int]) -> None:
    watcher = WireClient(address, name="watcher")
    try:
        watcher.wait_live(ranks)
    finally:
        watcher.close()


def _kill(handle: CoordinatorHandle, how: str = "kill") -> None:
    if how == "kill":
        handle.process.kill()  # no notice, no goodbye: only the dropped connection tells
    else:
        handle.process.terminate()  # SIGTERM: the coordinator says "shutdown" and fails nothing
    handle.process.join(5)


async def _drain(stream: RequestStream) -> list[StreamDelta]:
    return [delta async for delta in stream]


def _check_stream(deltas: list[StreamDelta], text: str) -> None:
    """Exactly one final delta, last; the deltas add up to the final text and token ids."""
    assert [d.finished for d in deltas].count(True) == 1 and deltas[-1].finished
    result = deltas[-1].result
    assert result is not None and result.ok and result.text == text
    assert "".join(d.text for d in deltas) == text, "a token or character was lost or repeated"
    assert tuple(t for d in deltas for t in d.token_ids) == result.token_ids == tuple(text.encode())


# ---------------------------------------------------------------------------- (a) restart


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_a_restarted_coordinator_costs_latency_not_errors(
    coordinator_factory: Factory, null_ranks: Factory, how: str
) -> None:
    first = coordinator_factory()
    null_ranks(first.address, [0, 1], delay_s=1.5, stream_chunks=6)
    _wait_live(first.address, [0, 1])
    restarted: list[CoordinatorHandle] = []

    async def go() -> None:
        async with AsyncInferenceClient(first.address, timeout_s=10) as client:
            futures = [client.add_request(f"plain {i}") for i in range(6)]
            streams = [client.add_request_streaming(f"streamed prompt number {i}") for i in range(4)]
            heads = [await s.__anext__() for s in streams]  # every stream delivered output
            assert not any(d.finished for d in heads) and not any(f.done() for f in futures)
            _kill(first, how)
            restarted.append(coordinator_factory(port=_port(first.address)))
            results = await asyncio.gather(*futures)
            tails = await asyncio.gather(*(_drain(s) for s in streams))
            assert [r.text for r in results] == [f"echo: plain {i}" for i in range(6)]
            assert all(r.ok for r in results), results
            for i, (head, tail) in enumerate(zip(heads, tails, strict=True)):
                _check_stream([head, *tail], f"echo: streamed prompt number {i}")
            assert client.num_reconnects == 1 and client.num_resubmitted == 10
            status = await client.status()  # the new coordinator ran each request once
            assert status["totals"]["submitted"] == 10 and status["totals"]["completed"] == 10
            assert status["counters"]["error_replies"].get("duplicate_request", 0) == 0

    run(go())
    assert restarted[0].address == first.address


def test_a_sync_stream_continues_across_a_restart(coordinator_factory: Factory, null_ranks: Factory) -> None:
    first = coordinator_factory()
    null_ranks(first.address, [0], delay_s=1.0, stream_chunks=5)
    _wait_live(first.address, [0])
    with InferenceClient(first.address, timeout_s=10, request_timeout_s=20) as client:
        stream = client.generate_stream("across a restart")
        deltas = [next(stream)]
        _kill(first)
        coordinator_factory(port=_port(first.address))
        deltas += list(stream)
        _check_stream(deltas, "echo: across a restart")
        assert client.num_reconnects == 1 and client.num_resubmitted == 1
        assert [r.text for r in client.generate(["after", "it"])] == ["echo: after", "echo: it"]
        assert client.status()["totals"]["completed"] == 3


def test_resubmission_resumes_streams_ignores_duplicates_and_holds_calls() -> None:
    """Against a stand-in hub: what a resubmission carries, and what happens to calls."""
    body = RequestBody(prompt="p", resume=Resume((7,), 1)).to_bytes()
    assert RequestBody.from_bytes(resumed_body(body, [8, 9], 2)).resume == Resume((7, 8, 9), 3)
    assert resumed_body(body, [], 0) is body

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        hub = ctx.socket(zmq.ROUTER)
        hub.bind("tcp://127.0.0.1:*")
        client = AsyncInferenceClient(hub.last_endpoint.decode(), timeout_s=5, reconnect_window_s=10)

        async def recv() -> tuple[bytes, p.Message]:
            identity, *frames = await hub.recv_multipart()
            return identity, p.decode(frames)

        async def send(identity: bytes, msg: p.Message) -> None:
            await hub.send_multipart([identity, *p.encode(msg)])

        async def expect(kind: type) -> tuple[bytes, Any]:
            while True:
                identity, msg = await recv()
                if isinstance(msg, kind):
                    return identity, msg
                assert isinstance(msg, p.ClientHello), msg  # keepalives may come at any time

        try:
            start = asyncio.create_task(client.start())
            identity, _ = await expect(p.ClientHello)
            assert identity == client.identity
            await send(identity, p.HelloAck(p.PROTOCOL_VERSION, p.EngineState.RUNNING, 1, 1, False, 30.0))
            await start
            plain = client.add_request("plain", rank=3)
            stream = client.add_request_streaming("streamed")
            _, submit = await expect(p.Submit)
            sid = stream.request_id
            delta = p.OutputBody(delta_text="ab", delta_token_ids=(1, 2)).to_bytes()
            await send(identity, p.Outputs((p.OutputEntry(sid, False, 0),), (delta,)))
            assert (await stream.__anext__()).text == "ab"
            status = asyncio.create_task(client.status())
            control = asyncio.create_task(client.pause_engines())
            await expect(p.StatusQuery)
            await expect(p.Control)
            await send(identity, p.Notice("shutdown", "restarting"))  # the hub goes away...
            with pytest.raises(ConnectionLostError, match="may or may not have been applied"):
                await control  # ...a control signal it may have applied is never sent again
            aborted = client.add_request("aborted while away")
            await client.abort_request(aborted.request_id)
            late = client.add_request("added while away")
            await expect(p.ClientHello)  # ...and a new one answers the client's hello
            await send(identity, p.HelloAck(p.PROTOCOL_VERSION, p.EngineState.RUNNING, 1, 2, False, 30.0))
            _, again = await expect(p.Submit)
            by_id = dict(zip((e.client_request_id for e in again.entries), again.bodies, strict=True))
            assert set(by_id) == {plain.request_id, sid, late.request_id}
            assert [(e.rank, e.stream) for e in again.entries if e.client_request_id == plain.request_id] == [
                (3, False)
            ]
            assert RequestBody.from_bytes(by_id[sid]).resume == Resume((1, 2), 2)
            assert by_id[plain.request_id] == submit.bodies[0]
            assert (await aborted).finish_reason == "abort"
            _, query = await expect(p.StatusQuery)  # the status query in flight is asked again
            await send(identity, p.StatusReply(query.query_id, (p.pack_body({"state": "running"}),)))
            assert (await status) == {"state": "running"}
            await send(identity, p.Error("duplicate_request", "still running", plain.request_id))
            finals = [
                (plain.request_id, p.OutputBody(text="done", finish_reason="stop")),
                (sid, p.OutputBody(text="abcd", delta_text="cd", finish_reason="stop")),
                (late.request_id, p.OutputBody(text="late", finish_reason="stop")),
            ]
            entries = tuple(p.OutputEntry(i, True, 0) for i, _ in finals)
            await send(identity, p.Outputs(entries, tuple(b.to_bytes() for _, b in finals)))
            assert (await plain).text == "done" and (await late).text == "late"
            assert [(d.text, d.finished) for d in await _drain(stream)] == [("cd", True)]
            assert (client.num_reconnects, client.num_resubmitted, client.num_duplicates) == (1, 3, 1)
        finally:
            await client.stop()
            hub.close(linger=0)
            ctx.term()

    run(go(), 20)


# ---------------------------------------------------------------------------- (b) the window


def test_b_no_coordinator_within_the_window_is_a_typed_error(
    coordinator_factory: Factory, null_ranks: Factory
) -> None:
    handle = coordinator_factory()
    null_ranks(handle.address, [0], delay_s=30.0, stream_chunks=300)  # nothing finishes
    _wait_live(handle.address, [0])

    async def go() -> None:
        async with AsyncInferenceClient(handle.address, timeout_s=10, reconnect_window_s=1.0) as client:
            futures = [client.add_request(f"pending {i}") for i in range(3)]
            stream = client.add_request_streaming("x" * 300)
            await stream.__anext__()
            _kill(handle)
            outcomes = await asyncio.gather(*futures, _drain(stream), return_exceptions=True)
            assert all(isinstance(o, ReconnectTimeoutError) for o in outcomes), outcomes
            assert all("within the 1 s reconnect window" in str(o) for o in outcomes), outcomes
            with pytest.raises(ReconnectTimeoutError):
                client.add_request("after the window")
            with pytest.raises(ReconnectTimeoutError):
                await client.status()

    run(go())


def test_b_sync_client_gets_the_typed_error(coordinator_factory: Factory, null_ranks: Factory) -> None:
    handle = coordinator_factory()
    null_ranks(handle.address, [0], delay_s=30.0, stream_chunks=300)
    _wait_live(handle.address, [0])
    with InferenceClient(handle.address, timeout_s=10, reconnect_window_s=1.0) as client:
        stream = client.generate_stream("y" * 300)
        next(stream)
        _kill(handle)
        with pytest.raises(ReconnectTimeoutError, match="within the 1 s reconnect window"):
            for _ in stream:
                pass
        with pytest.raises(ReconnectTimeoutError):
            client.generate("after the window")


# ---------------------------------------------------------------------------- (c) the lease


def test_c_keepalives_keep_idle_clients_and_a_silent_one_is_forgotten(
    coordinator_factory: Factory, null_ranks: Factory
) -> None:
    timeout_s = 0.5
    handle = coordinator_factory(client_timeout_s=timeout_s)
    null_ranks(handle.address, [0], delay_s=30.0)  # only an abort ends a request early
    observer = WireClient(handle.address, name="observer")  # asks for status: never silent
    observer.wait_live([0])
    sync_client = InferenceClient(handle.address, timeout_s=10)
    silent = WireClient(handle.address, name="silent")

    async def go() -> None:
        async with AsyncInferenceClient(handle.address, timeout_s=10) as client:
            silent.submit(["never read", "nor this"])
            idle_since = time.monotonic()

            def forgotten(s: dict[str, Any]) -> bool:
                aborted = s["totals"]["in_flight"] == 0 and rank_info(s, 0)["num_running"] == 0
                return (
                    s["counters"]["silent_clients"] >= 1
                    and aborted
                    and time.monotonic() > idle_since + 4 * timeout_s
                )

            # Both SDK clients stay idle while this waits (the async one's loop keeps running).
            status = await asyncio.to_thread(
                observer.wait_ranks, forgotten, 15.0, "the silent client forgotten"
            )
            assert status["counters"]["silent_clients"] == 1, "an SDK client was forgotten too"
            assert status["totals"]["aborted"] == 2 and rank_info(status, 0)["in_flight"] == 0
            assert status["totals"]["clients"] == 3  # observer and the two SDK clients
            assert client.num_reconnects == 0
            silent.submit(["again"])
            silent.wait_for(
                lambda: any(e.code == "not_handshaken" for e in silent.errors), 5, "not_handshaken"
            )

    try:
        run(go())
        status = sync_client.status()  # the async client said goodbye: observer and this one
        assert status["totals"]["clients"] == 2 and status["counters"]["silent_clients"] == 1
        assert sync_client.num_reconnects == 0, "the idle sync client had been forgotten"
    finally:
        sync_client.close()
        silent.close()
        observer.close()


# ---------------------------------------------------------------------------- (d) reconnect off


def test_d_reconnect_off_fails_at_once(coordinator_factory: Factory, null_ranks: Factory) -> None:
    handle = coordinator_factory()
    null_ranks(handle.address, [0], delay_s=30.0, stream_chunks=300)
    _wait_live(handle.address, [0])
    sync_client = InferenceClient(handle.address, timeout_s=10, reconnect=False)
    stream = sync_client.generate_stream("z" * 300)
    next(stream)

    async def go() -> None:
        async with AsyncInferenceClient(handle.address, timeout_s=10, reconnect=False) as client:
            futures = [client.add_request(f"pending {i}") for i in range(3)]
            while (await client.status())["totals"]["in_flight"] < 4:
                await asyncio.sleep(0.01)
            _kill(handle)
            killed_at = time.monotonic()
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert time.monotonic() - killed_at < 5, "the lost connection was noticed late"
            assert all(type(o) is ConnectionLostError for o in outcomes), outcomes
            assert client.num_reconnects == 0

    try:
        run(go())
        with pytest.raises(ConnectionLostError) as caught:
            for _ in stream:
                pass
        assert type(caught.value) is ConnectionLostError
    finally:
        sync_client.close()


# ---------------------------------------------------------------------------- (e) not reading


def test_e_a_client_that_stops_reading_is_disconnected(
    monkeypatch: pytest.MonkeyPatch, null_ranks: Factory
) -> None:
    """The hub's queue to a client is bounded: one that never reads fills it and is dropped,
    its requests aborted, while others are served. (The hub runs in this process with a small
    queue, so filling it takes megabytes, not the 100,000 messages of the real one.)"""
    monkeypatch.setattr(server, "_HWM", 64)
    config = CoordinatorConfig(port=0, heartbeat_interval_s=0.2, heartbeat_timeout_s=10.0)
    coordinator = server.Coordinator(config)
    thread = threading.Thread(target=coordinator.run, name="test-coordinator", daemon=True)
    thread.start()
    reader = zmq.Context.instance().socket(zmq.DEALER)
    try:
        null_ranks(coordinator.address, [0], delay_s=2.0, stream_chunks=50)  # floods, in pieces
        null_ranks(coordinator.address, [1], delay_s=60.0)  # holds: only an abort ends these
        observer = WireClient(coordinator.address, name="observer")
        observer.wait_live([0, 1])
        reader.setsockopt(zmq.RCVHWM, 1)
        reader.setsockopt(zmq.RCVBUF, 4096)
        reader.setsockopt(zmq.LINGER, 0)
        reader.connect(coordinator.address)
        reader.send_multipart(p.encode(p.ClientHello(p.PROTOCOL_VERSION, "never reads")))
        held = tuple(p.SubmitEntry(i, 1, True) for i in range(1, 6))
        reader.send_multipart(p.encode(p.Submit(held, tuple(p.pack_body({"prompt": "held"}) for _ in held))))
        big = p.pack_body({"prompt": "w" * 20_000})
        for batch in range(20):
            entries = tuple(p.SubmitEntry(100 + batch * 10 + j, 0, True) for j in range(10))
            reader.send_multipart(p.encode(p.Submit(entries, (big,) * len(entries))))

        def dropped(s: dict[str, Any]) -> bool:
            held_aborted = rank_info(s, 1)["in_flight"] == 0 and rank_info(s, 1)["num_running"] == 0
            return s["counters"]["slow_clients"] >= 1 and held_aborted and s["totals"]["in_flight"] == 0

        status = observer.wait_ranks(dropped, 30.0, "the client that stops reading dropped")
        assert status["counters"]["slow_clients"] == 1 and status["totals"]["aborted"] >= 5
        with InferenceClient(coordinator.address, timeout_s=10) as other:
            assert [r.text for r in other.generate(["served", "still"], rank=0)] == [
                "echo: served",
                "echo: still",
            ]
        observer.close()
    finally:
        reader.close(linger=0)
        coordinator.close()
        thread.join(10)
    assert not thread.is_alive()


def test_keepalive_interval_follows_the_hello_ack() -> None:
    client = AsyncInferenceClient("tcp://127.0.0.1:1")
    client.hello = p.HelloAck(p.PROTOCOL_VERSION, p.EngineState.RUNNING, 1, 5, True, 0.6)
    assert client._hello_interval_s() == pytest.approx(0.2)  # client_timeout_s / 3
    client.hello = dataclasses.replace(client.hello, client_timeout_s=300.0)
    assert client._hello_interval_s() == 5.0  # at least every few seconds
