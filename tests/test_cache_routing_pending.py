"""cache_aware's pending prefixes: what the hub routed to a rank before the rank reported it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from test_cache_routing import FINAL, PREFIX, Hub, keys_of, route
from test_cache_routing import hub as hub  # the same scripted hub fixture
from wire import rank_info

from dpinfer import protocol
from dpinfer.coordinator.pending_prefixes import PENDING_TTL_S, PendingPrefixes
from dpinfer.coordinator.registry import RankPeer
from dpinfer.coordinator.routing import CacheAware, make_policy
from dpinfer.protocol import prefix_keys
from dpinfer.protocol.codec import KIND_ENGINE_OUTPUTS, pack_batch

GROUP = "".join(f"group prefix sentence {i:03d}. " for i in range(40))[:1000]  # as bench routing's
SHARED = 7  # the 8 keys of GROUP + " Q: " + 24 characters: 7 shared, the 8th holds the question
BLOCK = prefix_keys.BLOCK_CHARS


def question(i: int) -> str:
    return GROUP + " Q: " + f"question number {i:04d}, please"[:24]


def packed(prompt: str) -> bytes:
    return prefix_keys.pack(keys_of(prompt))


def peer(rank: int) -> RankPeer:
    msg = protocol.Register(protocol.PROTOCOL_VERSION, rank, 100 + rank, "h", "cpu", "m", 10, 10)
    return RankPeer(f"r{rank}-{id(msg)}".encode(), msg, 0.0, protocol.EngineState.RUNNING)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy_and_ranks() -> tuple[CacheAware, list[RankPeer], Clock]:
    policy = make_policy("cache_aware")
    assert isinstance(policy, CacheAware)
    clock = Clock()
    policy.pending.clock = clock
    return policy, [peer(0), peer(1)], clock


def send(policy: CacheAware, ranks: list[RankPeer], prompt: str) -> tuple[RankPeer, protocol.RouteInfo]:
    """Route as the hub does: the chosen rank has one more request in flight."""
    chosen, info = policy.pick_keyed(ranks, packed(prompt))
    chosen.in_flight += 1
    return chosen, info


def test_a_burst_on_a_new_prefix_follows_the_first_request_before_any_report() -> None:
    policy, ranks, _ = policy_and_ranks()
    picks = [send(policy, ranks, question(i)) for i in range(5)]
    first = picks[0][0]
    assert picks[0][1] == protocol.RouteInfo("cache_aware", 0, "load")
    # Nothing reported yet, but the first request's prefix is on its way into first's cache.
    for chosen, info in picks[1:4]:
        assert chosen is first
        assert info == protocol.RouteInfo("cache_aware", SHARED * BLOCK, "pending")
    # 4 in flight outweigh the 896 matched characters (256 each): the fifth goes by load.
    other, info = picks[4]
    assert other is not first and info == protocol.RouteInfo("cache_aware", 0, "load")
    assert policy.pending.pending_on(other) == 8
    # The first's 8 keys and each follower's own last key are pending; the report ends them.
    assert policy.pending.pending_on(first) == 8 + 3
    policy.on_report(first, protocol.CacheReport(packed(question(0)), b""))
    assert policy.pending.pending_on(first) == 3
    for i in range(1, 4):  # the followers finish; their rank reported nothing more
        policy.finished(first, packed(question(i)))
    assert policy.pending.pending_on(first) == 0
    policy.finished(other, packed(question(4)))
    assert len(policy.pending) == 0
    for r in ranks:
        r.in_flight = 0
    chosen, info = send(policy, ranks, question(9))
    assert chosen is first and info == protocol.RouteInfo("cache_aware", SHARED * BLOCK, "match")


def test_a_hot_new_prefix_still_spreads_and_a_spread_records_nothing() -> None:
    policy, ranks, _ = policy_and_ranks()
    picks = [send(policy, ranks, PREFIX + f"hot {i}") for i in range(6)]  # 10 shared keys
    first = picks[0][0]
    assert [info.reason for _, info in picks[:4]] == ["load", "pending", "pending", "pending"]
    assert all(chosen is first for chosen, _ in picks[:4])
    other, info = picks[4]  # 4 more in flight than the other rank: the anti-hotspot rule
    assert other is not first and info == protocol.RouteInfo("cache_aware", 0, "spread")
    assert policy.pending.pending_on(other) == 0  # the prefix is on its way into first's cache
    assert picks[5][0] is first  # 4 against 1 in flight: below the threshold, the match wins


def test_a_pending_prefix_never_reported_expires_and_stops_attracting() -> None:
    policy, ranks, clock = policy_and_ranks()
    first, _ = send(policy, ranks, question(0))
    clock.now += PENDING_TTL_S - 0.5
    chosen, info = send(policy, ranks, question(1))
    assert chosen is first and info.reason == "pending"
    clock.now += 1.0  # the first request's entries are past their TTL (never refreshed)
    chosen, info = send(policy, ranks, question(2))
    assert chosen is not first
    assert info == protocol.RouteInfo("cache_aware", 0, "load")
    assert policy.pending.pending_on(first) == 1  # the second request's own last key, newer


def test_a_forgotten_rank_has_nothing_pending_and_its_new_registration_starts_empty() -> None:
    policy, ranks, _ = policy_and_ranks()
    first, _ = send(policy, ranks, question(0))
    assert policy.pending.pending_on(first) == 8
    policy.forget(first)  # it went away (the hub re-dispatches its requests) or re-registered
    assert len(policy.pending) == 0
    i = ranks.index(first)
    ranks[i] = peer(first.rank)  # the same rank id, registered again
    ranks[1 - i].in_flight = 1  # so that a pending match could not hide behind load
    chosen, info = send(policy, ranks, question(1))
    assert chosen is ranks[i] and info == protocol.RouteInfo("cache_aware", 0, "load")


def test_a_request_that_finished_unreported_ends_its_pending_keys() -> None:
    policy, ranks, _ = policy_and_ranks()
    first, _ = send(policy, ranks, question(0))
    first.in_flight -= 1
    policy.finished(first, packed(question(0)))  # its rank caches nothing (no report came)
    assert len(policy.pending) == 0
    assert send(policy, ranks, question(1))[1].reason == "load"


def test_a_reported_match_beats_an_equal_pending_one() -> None:
    policy, ranks, _ = policy_and_ranks()
    first, _ = send(policy, ranks, question(0))
    first.in_flight = 0
    other = ranks[1 - ranks.index(first)]
    policy.on_report(other, protocol.CacheReport(packed(question(0)), b""))  # cached elsewhere too
    chosen, info = send(policy, ranks, question(1))
    assert chosen is other and info == protocol.RouteInfo("cache_aware", SHARED * BLOCK, "match")


def test_the_pending_table_is_bounded_and_drops_its_oldest_entries() -> None:
    table = PendingPrefixes(cap=4)
    a, b = peer(0), peer(1)
    table.add(a, [1, 2, 3])
    table.add(b, [3, 4, 5])  # full at 4: keys 1 and 2 of a go first
    assert len(table) == 4
    assert table.match([1, 2, 3, 4, 5], 2) == {b: 5, a: 3}
    assert table.match([1, 2], 2) == {}
    table.resolve(a, [3])
    table.forget(b)
    assert len(table) == 0 and table.holders == {}


# ---------------------------------------------------------------------- through the hub


def test_a_burst_through_the_hub_stays_on_one_rank_and_each_stream_hears_its_route_first(hub: Hub) -> None:
    crids = hub.client.submit([PREFIX + f"burst {i}" for i in range(2)], keys=True, stream=True)
    hub.client.wait_for(lambda: sum(hub._num_requests(r) for r in (0, 1)) == 2, what="two dispatches")
    assert (hub._num_requests(0), hub._num_requests(1)) == (2, 0)  # one submit, one rank
    ids = hub.ranks[0].requests(2)
    partial = protocol.OutputBody(delta_text="d", delta_token_ids=(1,)).to_bytes()
    hub.ranks[0].wire.send_frames(
        [pack_batch(KIND_ENGINE_OUTPUTS, [(i, False, 1) for i in ids]), partial, partial]
    )
    hub.ranks[0].finals(ids, [FINAL, FINAL])
    results = hub.client.wait_results(crids)
    assert [route(r) for r in results] == [
        protocol.RouteInfo("cache_aware", 0, "load"),
        protocol.RouteInfo("cache_aware", 10 * BLOCK, "pending"),
    ]
    for result in results:  # the first partial output already said where it went, and why
        assert result.partial_routes == [result.routing]
    # Both finished and rank 0 reported nothing: the prefix no longer attracts.
    after = hub.submit(PREFIX + "after")
    assert route(after) == protocol.RouteInfo("cache_aware", 0, "load")


def test_streamed_sdk_deltas_say_where_they_went(deployment_factory: Callable[..., Any]) -> None:
    from dpinfer import InferenceClient

    chunks = {"stream_chunks": 3}
    dep = deployment_factory([0, 1], {0: chunks, 1: chunks}, routing="cache_aware")
    with InferenceClient(dep.address, timeout_s=10) as client:
        deltas = list(client.generate_stream(PREFIX + "one"))
        assert len(deltas) > 1 and deltas[-1].result is not None
        first, result = deltas[0].routing, deltas[-1].result
        assert first is not None and first == result.routing and first.reason == "load"
        assert all(d.routing is None for d in deltas[1:])
        dep.client.wait_ranks(lambda s: rank_info(s, result.rank)["prefix_keys"] >= 10, what="report")
        deltas = list(client.generate_stream(PREFIX + "two"))
        assert deltas[0].routing is not None
        assert (deltas[0].routing.rank, deltas[0].routing.reason) == (result.rank, "match")
