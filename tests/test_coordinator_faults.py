"""Faults through real sockets: slow, killed and frozen ranks; no ranks; garbage; CURVE."""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import threading
import time

import msgpack
import pytest
from wire import WireClient, live_ranks, rank_info

from dpinfer import protocol
from dpinfer.protocol import NO_RANK
from dpinfer.testing.null_rank import NullEngine


def test_least_loaded_avoids_a_slow_rank(deployment_factory) -> None:
    dep = deployment_factory([0, 1], {0: {"delay_s": 0.4}}, routing="least_loaded")
    c = dep.client
    # Keep a few requests in flight; the slow rank keeps its one and the fast rank takes the rest.
    ids: list[int] = []
    for i in range(40):
        ids.extend(c.submit([f"r{i}"]))
        c.wait_for(lambda: sum(1 for j in ids if j not in c.results) < 3, what="room in the window")
    results = c.wait_results(ids)
    counts = collections.Counter(r.rank for r in results)
    assert counts[1] >= 34, f"least_loaded should avoid the slow rank: {counts}"


def test_sigkill_mid_load_every_request_ends_within_5s(deployment_factory) -> None:
    dep = deployment_factory([0, 1, 2], {r: {"delay_s": 0.6, "stream_chunks": 3} for r in (0, 1, 2)})
    c = dep.client
    ids = c.submit([f"plain {i}" for i in range(30)]) + c.submit(
        [f"stream {i}" for i in range(30)], stream=True
    )
    # Kill rank 1 once some of its streamed requests have sent partials (and none finished).
    c.wait_for(
        lambda: any(r.rank == 1 and r.partials and r.final is None for r in c.results.values()),
        what="partial outputs from rank 1",
    )
    victim = dep.ranks[1]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    cut_off = [
        r.client_request_id for r in c.results.values() if r.rank == 1 and r.partials and r.final is None
    ]
    results = c.wait_results(ids, timeout_s=5.0)
    assert time.monotonic() - killed_at < 5.0
    assert all(r.num_finals == 1 for r in results)
    # Every request completes with its own text, the ones cut off mid-stream included: they
    # moved to another rank and went on from what they had streamed, nothing lost or repeated.
    assert all(r.final.finish_reason == "stop" for r in results), [r.final.error for r in results]
    prompts = [f"plain {i}" for i in range(30)] + [f"stream {i}" for i in range(30)]
    assert [r.final.text for r in results] == [f"echo: {p}" for p in prompts]
    assert all(r.streamed_text == r.final.text for r in results[30:])
    migrated = [r for r in results if r.client_request_id in cut_off]
    assert migrated and all(r.rank != 1 for r in migrated), "the final comes from the rank it moved to"
    status = c.status()
    assert not rank_info(status, 1)["alive"]
    assert status["counters"]["redispatched"] >= 1, "requests with no output yet must be re-dispatched"
    assert status["counters"]["migrated"] >= len(cut_off)


def test_sigstop_rank_is_declared_dead_then_reregisters(deployment_factory) -> None:
    dep = deployment_factory([0, 1], heartbeat_timeout_s=1.0, control_timeout_s=0.3)
    c = dep.client
    frozen = dep.ranks[1]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        # A control signal does not wait forever for a frozen rank.
        reply = c.control("pause", timeout_s=3)
        assert not reply.ok and reply.state == "paused"
        assert [(a.rank, a.ok) for a in reply.acks] == [(0, True), (1, False)]
        ids = c.submit(["while frozen"], rank=NO_RANK)
        c.wait_ranks(lambda s: 1 not in live_ranks(s), timeout_s=5, what="rank 1 to be declared dead")
        os.kill(frozen.pid, signal.SIGCONT)
        status = c.wait_ranks(lambda s: 1 in live_ranks(s), timeout_s=5, what="rank 1 to re-register")
        assert rank_info(status, 1)["pid"] == frozen.pid
        c.wait_ranks(
            lambda s: rank_info(s, 1)["state"] == "paused", timeout_s=3, what="the rank to apply PAUSED"
        )
        assert c.control("unpause").ok
        (result,) = c.wait_results(ids)
        assert result.final.text == "echo: while frozen" and result.num_finals == 1
    finally:
        os.kill(frozen.pid, signal.SIGKILL)  # SIGKILL also ends a stopped process


def test_requests_wait_for_a_rank_then_fail_in_time(coordinator_factory) -> None:
    handle = coordinator_factory(no_rank_timeout_s=1.0)
    c = WireClient(handle.address)
    engine_thread = None
    try:
        started = time.monotonic()
        (lost,) = c.wait_results(c.submit(["nobody home"]), timeout_s=5)
        assert lost.final.finish_reason == "error" and "no engine rank" in lost.final.error
        assert 0.9 <= time.monotonic() - started < 5
        waiting = c.submit(["a rank will come"])
        engine = NullEngine(handle.address, 0)  # a thread: it registers within the timeout
        engine_thread = threading.Thread(target=engine.run, daemon=True)
        engine_thread.start()
        (served,) = c.wait_results(waiting, timeout_s=5)
        assert served.final.text == "echo: a rank will come" and served.rank == 0
    finally:
        c.close()
        if engine_thread is not None:
            handle.stop(timeout_s=5)  # SHUTDOWN stops the rank thread too
            engine_thread.join(5)


# ---------------------------------------------------------------------------- garbage


def _frames(rng: random.Random, handshaken: bool) -> list[bytes]:
    kinds = [int(k) for k in protocol.Kind if k != protocol.Kind.REGISTER or handshaken] + [0, 7, 99, -1]
    pick = rng.randrange(6)
    if pick == 3 and not handshaken:  # a stranger's Register would be a real registration
        return protocol.encode(protocol.Submit((protocol.SubmitEntry(1, NO_RANK, False),), (b"x",)))
    if pick == 0:
        return [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 4))]
    if pick == 1:  # a known kind with fields of the wrong types
        junk = [
            rng.choice([None, "x", 1.5, -3, [1, "a"], {"k": b"v"}, b"\x00"])
            for _ in range(rng.randrange(0, 9))
        ]
        return [msgpack.packb([rng.choice(kinds), *junk])] + [b"body"] * rng.randrange(0, 2)
    if pick == 2:  # an unknown kind
        return [msgpack.packb([rng.randrange(100, 10**6), 1, 2])]
    if pick == 3:  # engine-rank or coordinator kinds from a client
        msg = rng.choice([
            protocol.Heartbeat(protocol.LoadStats(1, 1, 1, 1, 4), protocol.EngineState.RUNNING),
            protocol.EngineOutputs((protocol.EngineOutputEntry(rng.randrange(1, 500), True, 1),), (b"x",)),
            protocol.ControlAck(1, protocol.Signal.PAUSE, protocol.RankAck(0, True, protocol.EngineState.PAUSED)),  # noqa: E501
            protocol.Deregister("x"),
            protocol.Register(protocol.PROTOCOL_VERSION, 77, 1, "h", "cpu", "m", 1, 1),
            protocol.Outputs((protocol.OutputEntry(1, True, 0),), (b"x",)),
            protocol.RegisterAck(0, "running", 1.0),
        ])  # fmt: skip
        return protocol.encode(msg)
    if pick == 4:  # valid-looking structure, wrong sizes
        return [msgpack.packb([2, [[1, -1, True], [2, -1, False]]]), b"only one body"]
    return [msgpack.packb("not an array"), b""]


def test_ten_thousand_bad_frames_leave_the_coordinator_serving(deployment_factory) -> None:
    dep = deployment_factory([0], max_frame_bytes=1 << 20)
    rng = random.Random(7)
    handshaken = dep.new_client("fuzz-hello")
    strangers = [dep.new_client(f"fuzz-{i}", hello=False) for i in range(3)]
    senders = [handshaken, *strangers]
    for i in range(10_000):
        sender = senders[i % len(senders)]
        sender.send_frames(_frames(rng, handshaken=sender is handshaken))
        if i % 500 == 0:
            for s in senders:
                s.pump(0)
    oversize = dep.new_client("oversize", hello=False)
    oversize.send_frames([b"\x00" * (2 << 20)])
    status = dep.client.wait_ranks(lambda s: s["counters"]["disconnects"] >= 1, what="the oversize drop")
    counters = status["counters"]
    assert counters["malformed_frames"] > 1000 and counters["unknown_peers"] > 100
    assert counters["wrong_direction"] > 100
    assert live_ranks(status) == {0}, "no fuzzing peer may register as a rank"
    (result,) = dep.client.wait_results(dep.client.submit(["still serving"]))
    assert result.final.text == "echo: still serving"
    handshaken.pump(0.2)
    assert any(e.code == "wrong_direction" for e in handshaken.errors)
    assert any(e.code == "not_handshaken" for s in strangers for e in s.errors)


# ---------------------------------------------------------------------------- CURVE


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="libzmq built without CURVE")
def test_curve_lets_only_authorized_keys_in(tmp_path, coordinator_factory, null_ranks) -> None:
    from dpinfer.protocol.curve import create_keys

    server, client_dir, rank_dir, rogue_dir = (
        str(tmp_path / n) for n in ("server", "client", "rank", "rogue")
    )
    create_keys(server)
    create_keys(client_dir, "client", server_dir=server)
    create_keys(rank_dir, "rank0", server_dir=server)
    create_keys(rogue_dir, "client")  # a well-formed key pair the server never authorized
    shutil.copy(os.path.join(server, "server.key"), rogue_dir)
    handle = coordinator_factory(curve_dir=server)
    handle.client_curve_dir = client_dir
    null_ranks(handle.address, [0], curve_dir=rank_dir)
    null_ranks(handle.address, [1], curve_dir=rogue_dir, connect_timeout_s=3)  # may not register
    good = WireClient(handle.address, curve_dir=client_dir, name="good")
    plain = WireClient(handle.address, hello=False, name="plain")
    rogue = WireClient(handle.address, hello=False, curve_dir=rogue_dir, name="rogue")
    try:
        good.wait_live([0])
        for intruder in (plain, rogue):
            intruder.try_send(protocol.ClientHello(protocol.PROTOCOL_VERSION, "intruder"))
            intruder.try_send(protocol.Submit((protocol.SubmitEntry(1, NO_RANK, False),), (b"x",)))
            intruder.try_send(protocol.Control(1, "shutdown", {}))
        (result,) = good.wait_results(good.submit(["authorized"]))
        assert result.final.text == "echo: authorized"
        for intruder in (plain, rogue):
            assert not intruder.pump(0.3), f"{intruder.name} must get no reply at all"
        status = good.wait_ranks(
            lambda s: s["counters"]["handshake_failures"] >= 2, what="refused handshakes"
        )
        assert live_ranks(status) == {0}, "a rank without an authorized key must not register"
        assert status["totals"]["submitted"] == 1 and status["state"] == "running"
    finally:
        for c in (good, plain, rogue):
            c.close()
