"""Request ids that cannot collide or go stale (issue 9, cases 1 and 2 and the abort race).

A scripted rank (a raw DEALER speaking the protocol) plays the engine, so each scenario runs
exactly as described: a rank frozen past the heartbeat timeout that comes back and sends its
abort finals for the old copies; a coordinator restart while a rank still holds old ids.
"""

from __future__ import annotations

from wire import ScriptedRank, WireClient, final_body, live_ranks

from dpinfer import protocol
from dpinfer.protocol import error_body
from dpinfer.protocol.kinds import FinishReason


def test_a_falsely_dead_rank_cannot_end_the_re_dispatched_copies(coordinator_factory) -> None:
    # Case 1: frozen past the heartbeat timeout, declared dead; its requests wait for a rank and
    # go back to it once it registers again. Its abort finals for the old copies must not be
    # taken for the new copies' finals.
    handle = coordinator_factory(heartbeat_timeout_s=0.6)
    rank = ScriptedRank(handle.address)
    client = WireClient(handle.address)
    try:
        rank.register()
        ids = client.submit([f"p{i}" for i in range(8)])
        old = rank.requests(8)
        # Frozen: no heartbeat until the coordinator has declared the rank dead.
        client.wait_ranks(lambda s: 0 not in live_ranks(s), timeout_s=5, what="rank 0 declared dead")
        rank.register()  # it thaws and registers again (the rank main does so on not_registered)
        new = rank.requests(8, after=8)
        assert not set(new) & set(old), "a re-dispatched request must be a new attempt with a new id"
        aborted = error_body("re-registered", FinishReason.ABORT)
        rank.finals(old, [aborted] * 8)  # what a rank that drops its old copies sends
        rank.finals(new, [final_body(f"result {i}") for i in range(8)])
        results = client.wait_results(ids)
        client.pump_for(0.3)  # nothing more may arrive
        assert [r.final.finish_reason for r in results] == ["stop"] * 8
        assert [r.final.text for r in results] == [f"result {i}" for i in range(8)]
        assert all(r.num_finals == 1 for r in client.results.values())
        assert client.status()["counters"]["redispatched"] == 8
    finally:
        client.close()
        rank.close()


def test_an_aborted_request_whose_rank_dies_ends_as_aborted_and_never_runs(coordinator_factory) -> None:
    # Case 8: the client aborts; the rank dies before acknowledging. Not re-dispatched.
    handle = coordinator_factory(heartbeat_timeout_s=0.6)
    rank = ScriptedRank(handle.address)
    client = WireClient(handle.address)
    try:
        rank.register()
        (cid,) = client.submit(["to abort"])
        rank.requests(1)
        client.abort([cid])
        rank.wire.wait_for(lambda: bool(rank._of(protocol.EngineAbort)), what="the abort")
        client.wait_ranks(lambda s: 0 not in live_ranks(s), timeout_s=5, what="rank 0 declared dead")
        (result,) = client.wait_results([cid])
        assert result.final.finish_reason == "abort" and result.num_finals == 1
        rank.register()
        rank.wire.pump_for(0.3)
        assert len(rank.requests(1)) == 1 and len(rank._of(protocol.Requests)) == 1, "never sent again"
    finally:
        client.close()
        rank.close()


def test_a_restarted_coordinator_never_reuses_the_ids_a_rank_still_holds(coordinator_factory) -> None:
    # Case 2: server ids restart in a new coordinator; a rank that re-registers still holds ids
    # of the old one. The new client must never receive the old client's text.
    first = coordinator_factory()
    port = int(first.address.rsplit(":", 1)[1])
    rank = ScriptedRank(first.address)
    old_client = WireClient(first.address, name="old-client")
    try:
        first_ack = rank.register()
        old_client.submit(["old secret"])
        (held,) = rank.requests(1)
        first.stop(timeout_s=5)
        second = coordinator_factory(port=port)
        new_client = WireClient(second.address, name="new-client")
        try:
            second_ack = rank.register()  # what the rank does when its heartbeats go unanswered
            assert second_ack.incarnation != first_ack.incarnation, "a new coordinator says it is new"
            (cid,) = new_client.submit(["new request"])
            (fresh,) = rank.requests(1, after=1)
            assert fresh != held
            rank.finals([held], [final_body("old client's text")])  # a rank that did not drop it
            rank.finals([fresh], [final_body("new client's text")])
            (result,) = new_client.wait_results([cid])
            new_client.pump_for(0.3)
            assert result.final.text == "new client's text" and result.num_finals == 1
            assert list(new_client.results) == [cid]
        finally:
            new_client.close()
    finally:
        old_client.close()
        rank.close()


def test_request_ids_start_at_random_in_every_coordinator(coordinator_factory) -> None:
    restarts = 3
    starts = set()
    for _ in range(restarts):
        handle = coordinator_factory()
        rank = ScriptedRank(handle.address)
        client = WireClient(handle.address)
        try:
            rank.register()
            client.submit(["x"])
            (rid,) = rank.requests(1)
            starts.add(rid)
            assert 0 < rid < 2**62
        finally:
            client.close()
            rank.close()
            handle.stop(timeout_s=5)
    assert len(starts) == restarts
