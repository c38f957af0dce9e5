"""``AsyncInferenceClient`` through real sockets against a real coordinator and null engine ranks."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio
from wire import Deployment

from dpinfer import protocol as p
from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.errors import ConnectionLostError, InvalidRequestError, RequestTimeoutError, ServiceError
from dpinfer.sampling import SamplingParams

pytestmark = pytest.mark.timeout(60)


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_thousands_in_flight_all_complete_in_order(deployment: Deployment) -> None:
    async def go() -> None:
        async with AsyncInferenceClient(deployment.address, timeout_s=10) as client:
            futures = [client.add_request(f"p{i}", SamplingParams(max_new_tokens=2)) for i in range(3000)]
            assert len({f.request_id for f in futures}) == 3000
            results = await asyncio.gather(*futures)
            assert [r.text for r in results] == [f"echo: p{i}" for i in range(3000)]
            assert {r.finish_reason for r in results} == {"stop"} and {r.rank for r in results} == {0, 1}
            status = await client.status()
            assert status["totals"]["in_flight"] == 0

    run(go())


def test_a_tick_of_long_prompts_past_the_header_limit_goes_as_several_submits(deployment: Deployment) -> None:
    async def go() -> None:
        async with AsyncInferenceClient(deployment.address, timeout_s=10) as client:
            prompt = "x" * 4096  # 32 prefix keys each: 4,100 of them overflow one 1 MiB header
            one = SamplingParams(max_new_tokens=1)
            futures = [client.add_request(f"{i} {prompt}", one) for i in range(4100)]
            results = await asyncio.gather(*futures)
            assert all(r.text == f"echo: {i} {prompt}" for i, r in enumerate(results))

    run(go())


def test_async_streaming_and_images(deployment: Deployment) -> None:
    async def go() -> None:
        async with AsyncInferenceClient(deployment.address, timeout_s=10) as client:
            streams = [client.add_request_streaming(f"stream {i}", images=[b"\x89PNG"]) for i in range(3)]
            for i, stream in enumerate(streams):
                deltas = [d async for d in stream]
                assert deltas[-1].finished and deltas[-1].result is not None
                assert "".join(d.text for d in deltas) == deltas[-1].result.text == f"echo: stream {i}"

    run(go())


def test_parallel_requests_give_one_handle_per_completion_on_one_rank(deployment: Deployment) -> None:
    async def go() -> None:
        async with AsyncInferenceClient(deployment.address, timeout_s=10) as client:
            params = SamplingParams(n=3, seed=1, max_new_tokens=2)
            with pytest.raises(InvalidRequestError, match="use add_parallel_requests "):
                client.add_request("p", params)
            with pytest.raises(InvalidRequestError, match="add_parallel_requests_streaming"):
                client.add_request_streaming("p", params)
            results = await asyncio.gather(*client.add_parallel_requests("three", params))
            assert [r.index for r in results] == [0, 1, 2] and len({r.rank for r in results}) == 1
            assert [r.text for r in results] == ["echo: three"] * 3
            streams = client.add_parallel_requests_streaming("two", SamplingParams(n=2))
            for index, stream in enumerate(streams):
                deltas = [d async for d in stream]
                assert {d.index for d in deltas} == {index} and deltas[-1].result is not None
                assert deltas[-1].result.index == index

    run(go())


def test_abort_a_request_queued_while_paused(deployment: Deployment) -> None:
    async def go() -> None:
        async with AsyncInferenceClient(deployment.address, timeout_s=10) as client:
            ack = await client.pause_engines()
            assert ack.ok and ack.state == "paused" and len(ack.acks) == 2
            try:
                queued = client.add_request("waits", rank=0)
                kept = client.add_request("kept", rank=1)
                await client.abort_request(queued.request_id)
                aborted = await asyncio.wait_for(queued, 10)
                assert aborted.finish_reason == "abort" and not kept.done()
                with pytest.raises(ServiceError, match="paused"):
                    await client.pause_engines()
            finally:
                assert (await client.unpause_engines()).state == "running"
            assert (await asyncio.wait_for(kept, 10)).text == "echo: kept"

    run(go())


def test_start_times_out_when_nobody_answers() -> None:
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.bind("tcp://127.0.0.1:*")
    address = silent.last_endpoint.decode()
    try:
        with pytest.raises(RequestTimeoutError, match="no coordinator answered"):
            run(AsyncInferenceClient(address, timeout_s=0.3).start())
    finally:
        silent.close(linger=0)


def test_shutdown_notice_fails_pending_futures_and_streams() -> None:
    """A stand-in hub that handshakes, takes requests, then says ``Notice(shutdown)``."""

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        hub = ctx.socket(zmq.ROUTER)
        hub.bind("tcp://127.0.0.1:*")
        client = AsyncInferenceClient(hub.last_endpoint.decode(), timeout_s=5, reconnect=False)

        async def serve() -> None:
            identity, *frames = await hub.recv_multipart()
            assert isinstance(p.decode(frames), p.ClientHello)
            await hub.send_multipart([identity, *p.encode(p.HelloAck(p.PROTOCOL_VERSION, "running", 1))])
            identity, *frames = await hub.recv_multipart()
            submit = p.decode(frames)
            assert isinstance(submit, p.Submit) and len(submit.entries) == 4  # one batch for one tick
            await hub.send_multipart([identity, *p.encode(p.Notice("shutdown", "maintenance"))])

        server = asyncio.create_task(serve())
        try:
            await client.start()
            futures = [client.add_request(f"r{i}") for i in range(3)]
            stream = client.add_request_streaming("s")
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert all(isinstance(o, ConnectionLostError) for o in outcomes), outcomes
            with pytest.raises(ConnectionLostError, match="shut down: maintenance"):
                await stream.__anext__()
            with pytest.raises(ConnectionLostError):
                client.add_request("after")
            await server
        finally:
            await client.stop()
            hub.close(linger=0)
            ctx.term()

    run(go())


def test_killed_coordinator_fails_pending_futures() -> None:
    d = Deployment.start([0], {0: {"delay_s": 30.0}})  # nothing finishes before the kill

    async def go() -> None:
        async with AsyncInferenceClient(d.address, timeout_s=10, reconnect=False) as client:
            futures = [client.add_request(f"slow {i}") for i in range(5)]
            while (await client.status())["totals"]["in_flight"] < 5:
                await asyncio.sleep(0.01)
            d.handle.process.kill()  # no notice: only the dropped connection tells
            outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
            assert all(isinstance(o, ConnectionLostError) for o in outcomes), outcomes
            with pytest.raises(ConnectionLostError):
                await client.status()

    try:
        run(go())
    finally:
        d.close()
