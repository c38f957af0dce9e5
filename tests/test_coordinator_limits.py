"""Bounded queues: past a limit a request gets an immediate ``overloaded`` error, nothing is dropped.

One slow null rank (each request takes ``SLOW_S``) behind a coordinator that holds at most
``HUB_LIMIT`` requests, ``CLIENT_LIMIT`` per client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from conftest import FAST_TIMINGS
from wire import Deployment, ScriptedRank, WireClient, final_body, rank_info

from dpinfer import AsyncInferenceClient, SamplingParams, protocol
from dpinfer.protocol import ErrorCode
from dpinfer.rank.connection import registration

SLOW_S = 1.0
HUB_LIMIT = 6
CLIENT_LIMIT = 4


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    deployment = Deployment.start(
        [0], {0: {"delay_s": SLOW_S}}, max_queued_requests=HUB_LIMIT, max_client_requests=CLIENT_LIMIT,
        **FAST_TIMINGS,
    )  # fmt: skip
    yield deployment
    deployment.close()


def test_over_the_client_and_hub_limits_requests_are_refused_at_once(dep: Deployment) -> None:
    a, b = dep.new_client("a"), dep.new_client("b")
    try:
        first = a.submit([f"a{i}" for i in range(CLIENT_LIMIT + 1)])
        refused = a.wait_results(first[-1:], timeout_s=10 * SLOW_S)[0]
        assert refused.final is not None and refused.final.error_code == ErrorCode.OVERLOADED
        assert "--max-client-requests" in (refused.final.error or "")
        assert all(i not in a.results for i in first[:-1]), "refused at once, not after the queue"
        second = b.submit([f"b{i}" for i in range(HUB_LIMIT - CLIENT_LIMIT + 1)])
        refused_b = b.wait_results(second[-1:], timeout_s=10 * SLOW_S)[0]
        assert refused_b.final is not None and refused_b.final.error_code == ErrorCode.OVERLOADED
        assert "--max-queued-requests" in (refused_b.final.error or "")
        # Everything accepted completes, exactly once, with its own result.
        done_a = a.wait_results(first[:-1], timeout_s=15 * SLOW_S)
        done_b = b.wait_results(second[:-1], timeout_s=15 * SLOW_S)
        for result in (*done_a, *done_b):
            assert (
                result.num_finals == 1 and result.final is not None and result.final.finish_reason == "stop"
            )
        # Room again: the next request is served.
        again = a.wait_results(a.submit(["again"]), timeout_s=5 * SLOW_S)[0]
        assert again.final is not None and again.final.text == "echo: again"
        status = a.status()
        assert status["counters"]["overloaded"] == 2
    finally:
        a.close()
        b.close()


def test_the_sdk_reports_overloaded_as_a_typed_error_code(dep: Deployment) -> None:
    import asyncio

    async def run() -> list:
        client = AsyncInferenceClient(dep.address, timeout_s=15 * SLOW_S)
        await client.start()
        try:
            futures = [
                client.add_request(f"p{i}", SamplingParams(max_new_tokens=1)) for i in range(CLIENT_LIMIT + 2)
            ]
            return list(await asyncio.gather(*futures))
        finally:
            await client.stop()

    results = asyncio.run(run())
    codes = [r.error_code for r in results]
    assert codes.count(ErrorCode.OVERLOADED) == 2 and codes.count(None) == CLIENT_LIMIT, codes
    assert all(r.ok for r in results if r.error_code is None)


def test_dead_ranks_are_pruned_from_status_and_registrations_are_bounded(coordinator_factory) -> None:
    # Case 6: the hub kept every rank id ever registered (3,000 of them: a 33 MB status reply).
    handle = coordinator_factory(dead_rank_ttl_s=0.3, client_timeout_s=2.0)  # pruned at each sweep
    client = WireClient(handle.address)
    try:
        for rank in range(40):  # each registers, then leaves
            peer = WireClient(handle.address, name=f"rank{rank}", hello=False)
            peer.send(registration(rank))
            peer.wait_for(lambda p=peer: any(isinstance(m, protocol.RegisterAck) for m in p.other))
            peer.send(protocol.Deregister("done"))
            peer.close()
        client.wait_ranks(lambda s: len(s["ranks"]) == 0, timeout_s=10, what="dead ranks pruned")
        refused = WireClient(handle.address, name="bad", hello=False)
        try:
            refused.send(registration(1 << 20))
            refused.send(dataclasses.replace(registration(0), host="h" * 1000))
            refused.wait_for(lambda: len(refused.errors) == 2, what="two refusals")
            assert [e.code for e in refused.errors] == ["bad_register", "bad_register"]
            assert "rank id must be in 0.." in refused.errors[0].message
            assert "host name has 1000 characters" in refused.errors[1].message
        finally:
            refused.close()
        assert client.status()["ranks"] == []
    finally:
        client.close()


def test_ranks_take_work_by_credit_and_the_excess_waits_in_the_hub(coordinator_factory) -> None:
    # Build 7: a rank advertises how much it takes; the rest waits in the hub's bounded queue,
    # from which any rank with credit left is served first come, first served.
    handle = coordinator_factory()
    small = ScriptedRank(handle.address, rank=0, max_in_flight=2)
    client = WireClient(handle.address)
    big = None
    try:
        small.register()
        ids = client.submit([f"p{i}" for i in range(6)])
        first = small.requests(2)
        small.wire.pump_for(0.3)
        assert len(small.requests(2)) == 2 and sum(len(m.entries) for m in small._of(protocol.Requests)) == 2
        status = client.status()
        assert status["totals"]["pending"] == 4 and rank_info(status, 0)["credit"] == 2
        small.finals(first[:1], [final_body("a")])  # one slot frees: the oldest waiting request takes it
        (third,) = small.requests(1, after=2)
        big = ScriptedRank(handle.address, rank=1)  # a rank with no limit of its own takes the rest
        big.register()
        rest = big.requests(3)
        small.finals([first[1], third], [final_body("b"), final_body("c")])
        big.finals(rest, [final_body(x) for x in "def"])
        results = client.wait_results(ids)
        assert sorted(r.final.text for r in results) == list("abcdef")
        assert all(r.num_finals == 1 for r in results)
    finally:
        client.close()
        small.close()
        if big is not None:
            big.close()


def test_a_group_overflows_to_another_rank_when_its_rank_is_full(coordinator_factory) -> None:
    handle = coordinator_factory(routing="least_loaded")
    small = ScriptedRank(handle.address, rank=0, max_in_flight=2)
    big = ScriptedRank(handle.address, rank=1)
    client = WireClient(handle.address)
    try:
        small.register()
        big.register()
        first = client.submit(["x"], rank=1)  # rank 1 busier: the group's first goes to rank 0
        big.requests(1)
        ids = client.submit(["p"] * 4, group=7)
        on_small, on_big = small.requests(2), big.requests(3)[1:]
        small.finals(on_small, [final_body("a"), final_body("b")])
        big.finals(big.requests(1) + on_big, [final_body(x) for x in "xcd"])
        results = client.wait_results(first + ids)
        assert [r.rank for r in results] == [1, 0, 0, 1, 1], "two fit on rank 0, the rest follow the credit"
        assert all(r.num_finals == 1 for r in results)
    finally:
        client.close()
        small.close()
        big.close()
