"""Control signals, pause/abort semantics, STOP and SHUTDOWN through real sockets.

One deployment for the module: ranks 0 and 1 are fast, rank 2 is slow (each request takes
``SLOW_S``). The tests run in file order; the last ones stop the deployment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import FAST_TIMINGS
from wire import Deployment, live_ranks

from dpinfer.protocol import EngineState

SLOW_S = 1.0
RANKS = [0, 1, 2]


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    deployment = Deployment.start(RANKS, {2: {"delay_s": SLOW_S}}, **FAST_TIMINGS)
    yield deployment
    deployment.close()


def _check_acks(reply, state: str, ranks: list[int]) -> None:
    assert reply.ok, reply.error
    assert reply.state == state
    assert [(a.rank, a.ok, a.state) for a in reply.acks] == [(r, True, state) for r in ranks]


def test_every_control_transition_and_its_acks(dep: Deployment) -> None:
    c = dep.client
    steps = [
        # (signal, args, ok, state afterwards)
        ("unpause", {}, False, "running"),
        ("suspend", {}, False, "running"),
        ("resume", {}, False, "running"),
        ("update_weights", {"path": "/w"}, False, "running"),
        ("pause", {}, True, "paused"),
        ("pause", {}, False, "paused"),
        ("resume", {}, False, "paused"),
        ("update_weights", {}, False, "paused"),  # no path
        ("update_weights", {"path": "/w"}, True, "paused"),
        ("suspend", {}, True, "suspended"),
        ("pause", {}, False, "suspended"),
        ("unpause", {}, False, "suspended"),
        ("suspend", {}, False, "suspended"),
        ("update_weights", {"path": "/w"}, False, "suspended"),
        ("resume", {}, True, "paused"),
        ("unpause", {}, True, "running"),
        ("reboot", {}, False, "running"),
    ]
    for signal, args, ok, state in steps:
        reply = c.control(signal, args)
        assert reply.signal == signal
        if ok:
            _check_acks(reply, state, RANKS)
        else:
            assert not reply.ok and reply.acks == () and reply.state == state, (signal, reply)
            assert reply.error, f"{signal}: an invalid request must say why"
            if signal != "reboot" and (args or signal != "update_weights"):
                assert f"while {state}" in reply.error, reply.error
    assert c.status()["state"] == "running"


def test_concurrent_controls_are_serialised(dep: Deployment) -> None:
    c = dep.client
    ids = [c.send_control(s) for s in ("pause", "unpause", "pause", "unpause")]
    replies = [c.wait_control(i) for i in ids]
    assert [r.state for r in replies] == ["paused", "running", "paused", "running"]
    assert all(r.ok and len(r.acks) == len(RANKS) for r in replies)


def test_requests_while_paused_complete_after_unpause_exactly_once(dep: Deployment) -> None:
    c = dep.client
    assert c.control("pause").ok
    ids = c.submit([f"p{i}" for i in range(4)], rank=0) + c.submit([f"q{i}" for i in range(4)], rank=1)
    c.pump_for(0.3)
    assert not any(c.results.get(i) for i in ids), "nothing may complete while paused"
    assert c.status()["totals"]["in_flight"] >= len(ids)
    assert c.control("unpause").ok
    results = c.wait_results(ids)
    c.pump_for(0.2)
    assert all(r.num_finals == 1 and r.final.finish_reason == "stop" for r in results)
    assert [r.final.text for r in results[:4]] == [f"echo: p{i}" for i in range(4)]


def test_abort_of_a_queued_request_while_paused(dep: Deployment) -> None:
    c = dep.client
    assert c.control("pause").ok
    keep, drop = c.submit(["keep", "drop"], rank=0)
    c.pump_for(0.1)
    c.abort([drop])
    (aborted,) = c.wait_results([drop])
    assert aborted.final.finish_reason == "abort" and c.results.get(keep) is None
    assert c.control("unpause").ok
    (kept,) = c.wait_results([keep])
    assert kept.final.text == "echo: keep" and kept.num_finals == 1


def test_abort_of_a_running_request_on_a_slow_rank(dep: Deployment) -> None:
    c = dep.client
    (rid,) = c.submit(["slow one"], rank=2)
    c.pump_for(0.1)
    started = time.monotonic()
    c.abort([rid])
    (result,) = c.wait_results([rid], timeout_s=SLOW_S / 2)
    assert result.final.finish_reason == "abort"
    assert time.monotonic() - started < SLOW_S / 2


def test_stop_drains_then_rejects_then_a_new_rank_restarts(dep: Deployment) -> None:
    c = dep.client
    slow_ids = c.submit(["drain me"], rank=2)
    fast_ids = c.submit(["fast"])
    c.pump_for(0.1)
    reply = c.control("stop", {"drain": True, "deadline_s": 5.0}, timeout_s=10)
    _check_acks(reply, "stopped", RANKS)
    results = c.wait_results(slow_ids + fast_ids)
    assert results[0].final.text == "echo: drain me", "draining must finish in-flight work"
    for rank in RANKS:
        dep.ranks[rank].join(5)
        assert dep.ranks[rank].exitcode == 0, f"rank {rank} must exit cleanly after STOP"
    status = c.wait_ranks(lambda s: not live_ranks(s), what="every rank to deregister")
    assert status["state"] == "stopped"
    (rejected,) = c.wait_results(c.submit(["too late"]))
    assert rejected.final.finish_reason == "error" and "stopped" in rejected.final.error
    for signal in ("pause", "stop", "unpause", "suspend", "resume"):
        reply = c.control(signal)
        assert not reply.ok and "while stopped" in reply.error, (signal, reply)
    dep.add_rank(5)
    assert c.status()["state"] == EngineState.RUNNING.value
    (served,) = c.wait_results(c.submit(["back"]))
    assert served.rank == 5 and served.final.text == "echo: back"


def test_stop_without_drain_aborts_in_flight_work(dep: Deployment) -> None:
    c = dep.client
    dep.add_rank(6, delay_s=5.0)
    (rid,) = c.submit(["abort me"], rank=6)
    c.pump_for(0.1)
    reply = c.control("stop", {"drain": False}, timeout_s=3)
    _check_acks(reply, "stopped", [5, 6])
    (result,) = c.wait_results([rid], timeout_s=1)
    assert result.final.finish_reason == "abort"


def test_shutdown_notifies_clients_and_exits(dep: Deployment) -> None:
    c = dep.client
    dep.add_rank(7)
    other = dep.new_client("bystander")
    reply = c.control("shutdown")
    assert reply.ok and [a.rank for a in reply.acks] == [7]
    for client in (c, other):
        client.wait_for(lambda cl=client: bool(cl.notices), what="the shutdown notice")
        assert client.notices[0].code == "shutdown"
    dep.handle.process.join(5)
    assert dep.handle.process.exitcode == 0
    dep.ranks[7].join(5)
    assert dep.ranks[7].exitcode == 0
