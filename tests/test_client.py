"""``InferenceClient`` through real sockets against a real coordinator and null engine ranks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from wire import Deployment

from dpinfer import protocol as p
from dpinfer.client.sync_client import InferenceClient
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.process import start_coordinator
from dpinfer.errors import ConnectionLostError, InvalidRequestError, RequestTimeoutError, ServiceError
from dpinfer.rank.connection import EngineConnection, registration
from dpinfer.sampling import SamplingParams

pytestmark = pytest.mark.timeout(60)


def wait_for_live_ranks(address: str, num_ranks: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    with InferenceClient(address, timeout_s=timeout_s) as client:
        while client.status()["totals"]["live_ranks"] < num_ranks:
            assert time.monotonic() < deadline, f"{num_ranks} ranks did not register in {timeout_s} s"
            time.sleep(0.02)


@pytest.fixture
def client(deployment: Deployment) -> Iterator[InferenceClient]:
    with InferenceClient(deployment.address, timeout_s=10) as c:
        yield c


def test_generate_one(client: InferenceClient) -> None:
    (result,) = client.generate("hello")
    assert result.text == "echo: hello" and result.finish_reason == "stop" and result.ok
    assert result.rank in (0, 1) and result.latency_s > 0 and result.completion_tokens == len(result.text)
    assert client.num_ranks == 2


def test_generate_many_keeps_input_order_and_spreads_over_ranks(client: InferenceClient) -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    results = client.generate(prompts, SamplingParams(max_new_tokens=4))
    assert [r.text for r in results] == [f"echo: {q}" for q in prompts]
    assert [r.request_id for r in results] == sorted(r.request_id for r in results)
    assert {r.rank for r in results} == {0, 1}


def test_token_ids_chat_and_mixed_prompts(client: InferenceClient) -> None:
    (one,) = client.generate([5, 6, 7])
    assert one.text == "echo: 5 6 7"
    results = client.generate([[1, 2], {"messages": [{"role": "user", "content": "hey"}]}, {"prompt": "p"}])
    assert [r.text for r in results] == ["echo: 1 2", "echo: hey", "echo: p"]
    with pytest.raises(InvalidRequestError):
        client.generate(["ok", ""])


def test_streaming_deltas_concatenate_to_the_final_text(client: InferenceClient) -> None:
    deltas = list(client.generate_stream("a streamed prompt"))
    assert len(deltas) >= 2 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    final = deltas[-1].result
    assert final is not None and final.text == "echo: a streamed prompt"
    assert "".join(d.text for d in deltas) == final.text
    assert sum((d.token_ids for d in deltas), ()) == final.token_ids


def test_leaving_a_stream_early_keeps_the_client_usable(client: InferenceClient) -> None:
    stream = client.generate_stream("first")
    next(stream)
    stream.close()
    (result,) = client.generate("second")
    assert result.text == "echo: second"


def test_control_acks_and_invalid_transitions(client: InferenceClient) -> None:
    ack = client.pause_engines()
    try:
        assert ack.ok and ack.state == "paused" and ack.signal == "pause"
        assert sorted(a.rank for a in ack.acks) == [0, 1] and all(a.state == "paused" for a in ack.acks)
        with pytest.raises(ServiceError, match="paused"):
            client.pause_engines()
        assert client.status()["state"] == "paused"
        suspended = client.suspend_engines()
        assert suspended.state == "suspended"
        assert client.resume_engines().state == "paused"
    finally:
        assert client.unpause_engines().state == "running"
    with pytest.raises(ServiceError, match="running"):
        client.resume_engines()


def test_status_lists_every_rank(client: InferenceClient) -> None:
    status = client.status()
    assert status["state"] == "running"
    assert sorted(r["rank"] for r in status["ranks"]) == [0, 1]
    assert status["totals"]["live_ranks"] == 2


def test_timeout_when_no_coordinator_answers() -> None:
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    silent.bind("tcp://127.0.0.1:*")
    address = silent.last_endpoint.decode()
    try:
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError, match=f"no coordinator answered at {address}"):
            InferenceClient(address, timeout_s=0.3)
        assert time.monotonic() - start < 3
    finally:
        silent.close(linger=0)


def test_killed_coordinator_fails_a_pending_generate() -> None:
    d = Deployment.start([0], {0: {"delay_s": 30.0}})  # requests stay pending until the hub goes away
    errors: list[BaseException] = []
    started = threading.Event()

    def call() -> None:
        with InferenceClient(d.address, timeout_s=5, reconnect=False) as c:
            started.set()
            try:
                c.generate("never answered")
            except (ConnectionLostError, RequestTimeoutError, ServiceError) as e:
                errors.append(e)

    thread = threading.Thread(target=call)
    try:
        thread.start()
        assert started.wait(10)
        deadline = time.monotonic() + 10
        with InferenceClient(d.address, timeout_s=5) as watcher:
            while watcher.status()["totals"]["in_flight"] < 1:
                assert time.monotonic() < deadline, "the request never reached the coordinator"
                time.sleep(0.01)
        d.handle.process.kill()  # no shutdown notice: only the dropped connection tells
        killed_at = time.monotonic()
        thread.join(15)
        assert not thread.is_alive(), "generate hung after the coordinator died"
        assert len(errors) == 1 and isinstance(errors[0], ConnectionLostError), errors
        assert time.monotonic() - killed_at < 5, "the lost connection was noticed late"
    finally:
        d.close()


class _SamplingEchoRank(threading.Thread):
    """A rank that answers each request with the sampling map it received (as JSON text)."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.conn = EngineConnection(address, registration(7, model="sampling-echo"), context=zmq.Context())
        self.stop_event = threading.Event()

    def run(self) -> None:
        self.conn.connect_and_register(10)
        while not self.stop_event.is_set():
            if self.conn.socket.poll(50, zmq.POLLIN):
                for msg in self.conn.recv_ready():
                    if isinstance(msg, p.Requests):
                        self._answer(msg)
            if self.conn.seconds_until_heartbeat() == 0:
                self.conn.send_heartbeat(p.LoadStats(), p.EngineState.RUNNING)
        self.conn.deregister("test over")
        self.conn.close()

    def _answer(self, msg: p.Requests) -> None:
        entries, bodies = [], []
        for (request_id, _), body in zip(msg.entries, msg.bodies, strict=True):
            sampling = msgpack.unpackb(body)["sampling"]
            text = json.dumps(sampling, sort_keys=True)
            entries.append(p.EngineOutputEntry(request_id, True, 1))
            bodies.append(p.OutputBody(text=text, finish_reason="stop").to_bytes())
        self.conn.send_outputs(entries, bodies)


def test_per_prompt_sampling_params_reach_the_rank() -> None:
    handle = start_coordinator(CoordinatorConfig(port=0))
    rank = _SamplingEchoRank(handle.address)
    rank.start()
    try:
        wait_for_live_ranks(handle.address, 1)
        params = [SamplingParams(max_new_tokens=3), SamplingParams(temperature=0.0, stop=("x",), seed=4)]
        with InferenceClient(handle.address, timeout_s=5) as c:
            results = c.generate(["a", "b"], params, rank=7)
        assert [json.loads(r.text) for r in results] == [sp.to_dict() for sp in params]
        assert all(r.rank == 7 for r in results)
    finally:
        rank.stop_event.set()
        rank.join(5)
        handle.stop()


def test_a_moved_streams_final_logprobs_cover_every_token() -> None:
    # A continuation's final output holds every token id but the logprobs of its own tokens;
    # the SDK puts the ones the stream's deltas carried in front.
    from dpinfer.client.results import result_of

    def lp(token: int) -> p.PositionLogprobs:
        return p.PositionLogprobs((token,), (-0.5 * token,))

    body = p.OutputBody(text="abcd", token_ids=(1, 2, 3, 4), finish_reason="length", logprobs=(lp(3), lp(4)))
    streamed = [lp(1), lp(2), lp(3)]  # before the move: 1, 2; after it: 3 (its tail is in the final)
    result = result_of(7, 0, body, 0.1, streamed=streamed)
    assert result.logprobs == [{1: -0.5}, {2: -1.0}, {3: -1.5}, {4: -2.0}]
    whole = p.OutputBody(text="ab", token_ids=(1, 2), finish_reason="length", logprobs=(lp(1), lp(2)))
    assert result_of(8, 0, whole, 0.1, streamed=[lp(1)]).logprobs == [{1: -0.5}, {2: -1.0}]
