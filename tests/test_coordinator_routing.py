"""Registration and routing through real sockets: one coordinator process + 4 null ranks."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

import pytest
from conftest import FAST_TIMINGS
from wire import Deployment, WireClient, live_ranks, rank_info

from dpinfer import protocol
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.server import Coordinator
from dpinfer.testing.null_rank import NullEngine

RANKS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    deployment = Deployment.start(RANKS, {}, **FAST_TIMINGS)
    yield deployment
    deployment.close()


def test_ranks_register_with_their_details(dep: Deployment) -> None:
    status = dep.client.status()
    assert live_ranks(status) >= set(RANKS)
    for rank in RANKS:
        info = rank_info(status, rank)
        assert info["pid"] == dep.ranks[rank].pid
        assert info["device"] == "cpu" and info["model"] == "null" and info["host"]
        assert info["heartbeat_age_s"] < 1.0
    assert status["state"] == "running"
    hello = WireClient(dep.address, name="late").hello_acks[-1]
    assert hello.num_ranks >= 4 and hello.state == "running"


def test_round_robin_spreads_within_one(dep: Deployment) -> None:
    ids = dep.client.submit([f"req {i}" for i in range(41)])
    results = dep.client.wait_results(ids)
    counts = collections.Counter(r.rank for r in results if r.rank in RANKS)
    assert sum(counts.values()) == 41 and set(counts) == set(RANKS)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert all(r.final.text == f"echo: req {i}" and r.num_finals == 1 for i, r in enumerate(results))


def test_the_completions_of_one_prompt_go_to_one_rank(dep: Deployment) -> None:
    grouped = dep.client.wait_results(dep.client.submit(["same"] * 4, group=12345))
    assert len({r.rank for r in grouped}) == 1, "one group: one rank prefills the prompt once"
    spread = dep.client.wait_results(dep.client.submit(["same"] * 4))
    assert len({r.rank for r in spread}) == 4, "without a group round robin spreads them"


def test_pinned_requests_go_to_their_rank(dep: Deployment) -> None:
    results = dep.client.wait_results(dep.client.submit(["a", "b", "c"], rank=2))
    assert {r.rank for r in results} == {2}


def test_unknown_pinned_rank_gets_an_error_reply(dep: Deployment) -> None:
    (result,) = dep.client.wait_results(dep.client.submit(["x"], rank=42))
    assert result.final.finish_reason == "error" and "rank 42" in result.final.error


def test_streaming_partials_concatenate_to_the_final_text(dep: Deployment) -> None:
    prompts = ["héllo wörld, streaming ✓ 😀", "second stream"]
    results = dep.client.wait_results(dep.client.submit(prompts, stream=True))
    for prompt, result in zip(prompts, results, strict=True):
        assert len(result.partials) >= 1, "a streamed request must get partial outputs"
        assert result.streamed_text == result.final.text == f"echo: {prompt}"


def test_submit_before_hello_is_refused(dep: Deployment) -> None:
    stranger = dep.new_client("stranger", hello=False)
    stranger.submit(["sneaky"])
    stranger.wait_for(lambda: bool(stranger.errors), what="an Error reply")
    assert stranger.errors[0].code == "not_handshaken" and not stranger.results


def test_wrong_protocol_version_is_refused(dep: Deployment) -> None:
    old = dep.new_client("old", hello=False)
    old.send(protocol.ClientHello(protocol.PROTOCOL_VERSION + 1, "from the future"))
    old.wait_for(lambda: bool(old.errors), what="an Error reply")
    assert old.errors[0].code == "version_mismatch" and not old.hello_acks


def test_client_bye_forgets_the_client(dep: Deployment) -> None:
    leaving = dep.new_client("leaving")
    before = dep.client.status()["totals"]["clients"]
    leaving.send(protocol.ClientBye())
    dep.client.wait_ranks(lambda s: s["totals"]["clients"] == before - 1, what="the client to leave")
    leaving.submit(["after bye"])
    leaving.wait_for(lambda: bool(leaving.errors), what="an Error reply")
    assert leaving.errors[0].code == "not_handshaken"


def test_late_join_then_restart_reregisters_the_rank(dep: Deployment) -> None:
    first = dep.add_rank(4)
    results = dep.client.wait_results(dep.client.submit(["to four"], rank=4))
    assert results[0].rank == 4 and results[0].final.text == "echo: to four"
    # A new process for the same rank id (the old one still runs) takes the rank over.
    second = dep.add_rank(4)
    assert second.pid != first.pid
    info = rank_info(dep.client.status(), 4)
    assert info["alive"] and info["pid"] == second.pid
    first.join(10)  # the displaced process is told its rank was taken, and exits
    assert first.exitcode == 1
    (result,) = dep.client.wait_results(dep.client.submit(["again"], rank=4))
    assert result.final.text == "echo: again"


# ---------------------------------------------------------------------------- deterministic


def _routing_sequence(join_order: list[int], deterministic: bool) -> list[int]:
    """Ranks (threads here: cheap) join in ``join_order``; the ranks 9 requests land on."""
    config = CoordinatorConfig(port=0, deterministic=deterministic, **FAST_TIMINGS)
    coordinator = Coordinator(config)
    loop = threading.Thread(target=coordinator.run, daemon=True)
    loop.start()
    engines = [NullEngine(coordinator.address, rank) for rank in join_order]
    threads = []
    client = WireClient(coordinator.address)
    try:
        for engine in engines:
            threads.append(threading.Thread(target=engine.run, daemon=True))
            threads[-1].start()
            client.wait_live([engine.conn.info.rank])  # fix the registration order
        results = client.wait_results(client.submit([str(i) for i in range(9)]))
        client.control("shutdown")
        return [r.rank for r in results]
    finally:
        client.close()
        coordinator.close()
        loop.join(5)
        for thread in threads:
            thread.join(5)


def test_deterministic_routing_repeats_across_deployments() -> None:
    first = _routing_sequence([2, 0, 1], deterministic=True)
    second = _routing_sequence([1, 2, 0], deterministic=True)
    assert first == second == [0, 1, 2] * 3
    assert _routing_sequence([2, 0, 1], deterministic=False) == [2, 0, 1] * 3
