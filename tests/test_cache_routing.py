"""cache_aware routing: the hub's index follows exactly what ranks report (scripted ranks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dpinfer import protocol
from dpinfer.coordinator.process import CoordinatorHandle
from dpinfer.protocol import NO_RANK, prefix_keys
from dpinfer.protocol.bodies import RequestBody
from dpinfer.runner.radix_cache import RadixCache
from dpinfer.scheduler.cache_keys import CacheKeyTracker
from tests.wire import Result, ScriptedRank, WireClient, rank_info

PREFIX = "".join(f"shared system prompt line {i:03d}. " for i in range(50))[:1280]  # 10 key blocks
FINAL = protocol.OutputBody(text="done", finish_reason="stop").to_bytes()


def keys_of(prompt: str, images: tuple[bytes, ...] = ()) -> list[int]:
    return prefix_keys.body_keys(RequestBody(prompt=prompt, images=images))


class Hub:
    """A cache_aware coordinator, two scripted ranks and a client."""

    def __init__(self, handle: CoordinatorHandle) -> None:
        self.handle = handle
        self.client = WireClient(handle.address)
        self.ranks = {r: ScriptedRank(handle.address, r) for r in (0, 1)}
        for rank in self.ranks.values():
            rank.register()
        self.client.wait_live([0, 1])
        self.crids: list[int] = []

    def report(
        self, rank: int, inserted: list[int] = (), evicted: list[int] = (), reset: bool = False
    ) -> None:  # type: ignore[assignment]
        msg = protocol.CacheReport(prefix_keys.pack(inserted), prefix_keys.pack(evicted), reset)
        self.ranks[rank].wire.send(msg)

    def wait_held(self, rank: int, count: int) -> None:
        self.client.wait_ranks(
            lambda s: rank_info(s, rank)["prefix_keys"] == count, what=f"rank {rank} index"
        )

    def submit(self, prompt: str, finish: bool = True) -> Result | int:
        """Send one keyed request; finish it on whichever rank got it; its result (or its rank)."""
        before = {r: self._num_requests(r) for r in self.ranks}
        (crid,) = self.client.submit([prompt], keys=True)
        return self._follow(crid, before, finish)

    def submit_body(self, body: RequestBody) -> Result:
        """The same for a body of any kind (with the keys the SDK computes for it)."""
        before = {r: self._num_requests(r) for r in self.ranks}
        crid = 1000 + len(self.crids)
        packed = prefix_keys.pack(prefix_keys.body_keys(body))
        entry = protocol.SubmitEntry(crid, NO_RANK, False, packed)
        self.client.send(protocol.Submit((entry,), (body.to_bytes(),)))
        result = self._follow(crid, before, True)
        assert isinstance(result, Result)
        return result

    def _follow(self, crid: int, before: dict[int, int], finish: bool) -> Result | int:
        self.crids.append(crid)
        self.client.wait_for(
            lambda: any(self._num_requests(r) > before[r] for r in self.ranks), what="a dispatch"
        )
        rank = next(r for r in self.ranks if self._num_requests(r) > before[r])
        if not finish:
            return rank
        (request_id,) = self.ranks[rank].requests(1, after=before[rank])
        self.ranks[rank].finals([request_id], [FINAL])
        (result,) = self.client.wait_results([crid])
        return result

    def _num_requests(self, rank: int) -> int:
        wire = self.ranks[rank].wire
        wire.pump(0)
        return sum(len(m.entries) for m in wire.other if isinstance(m, protocol.Requests))

    def close(self) -> None:
        self.client.close()
        for rank in self.ranks.values():
            rank.close()


@pytest.fixture
def hub(coordinator_factory: Callable[..., CoordinatorHandle]) -> Iterator[Hub]:
    h = Hub(
        coordinator_factory(
            routing="cache_aware",
            deterministic=True,
            cache_spread_threshold=2,
            heartbeat_interval_s=5.0,
            heartbeat_timeout_s=60.0,  # scripted ranks send no heartbeats
        )
    )
    yield h
    h.close()


def route(result: Any) -> protocol.RouteInfo:
    assert isinstance(result, Result) and result.routing is not None
    return result.routing


def test_a_prefix_reported_by_rank_k_routes_there_and_stops_once_evicted(hub: Hub) -> None:
    keys = keys_of(PREFIX)
    assert len(keys) == 10
    first = hub.submit(PREFIX + "first question")
    assert route(first).reason == "load"  # nothing reported yet: no guessing from dispatches
    hub.report(1, keys)
    hub.wait_held(1, 10)
    for suffix in ("second", "third"):
        result = hub.submit(PREFIX + suffix)
        assert isinstance(result, Result) and result.rank == 1
        assert route(result) == protocol.RouteInfo("cache_aware", 10 * prefix_keys.BLOCK_CHARS, "match")
    hub.report(1, evicted=keys[4:])  # the tail of the prefix is gone: a shorter match remains
    hub.wait_held(1, 4)
    result = hub.submit(PREFIX + "fourth")
    assert isinstance(result, Result) and result.rank == 1
    assert route(result).matched_chars == 4 * prefix_keys.BLOCK_CHARS
    hub.report(1, evicted=keys[:4])
    hub.wait_held(1, 0)
    reasons = {route(hub.submit(PREFIX + f"after eviction {i}")).reason for i in range(2)}
    assert reasons == {"load"}


def test_a_re_registered_rank_gets_no_prefix_traffic_until_it_reports(hub: Hub) -> None:
    keys = keys_of(PREFIX)
    hub.report(0, keys)
    hub.wait_held(0, 10)
    assert route(hub.submit(PREFIX + "a")).reason == "match"
    hub.ranks[0].close()
    hub.ranks[0] = ScriptedRank(hub.handle.address, 0)  # a restarted process: a new identity
    hub.ranks[0].register()
    hub.wait_held(0, 0)
    for i in range(3):
        assert route(hub.submit(PREFIX + f"b{i}")).matched_chars == 0
    hub.report(0, keys[:6], reset=True)
    hub.wait_held(0, 6)
    result = hub.submit(PREFIX + "c")
    assert isinstance(result, Result) and result.rank == 0
    assert route(result) == protocol.RouteInfo("cache_aware", 6 * prefix_keys.BLOCK_CHARS, "match")


def test_a_hot_prefix_spreads_once_its_rank_is_loaded_past_the_threshold(hub: Hub) -> None:
    hub.report(0, keys_of(PREFIX))
    hub.wait_held(0, 10)
    ranks = [hub.submit(PREFIX + f"hot {i}", finish=False) for i in range(6)]
    # Rank 0 takes the prefix until it holds 2 (the threshold) more than rank 1, then the
    # least-loaded rank gets it: never all on the rank that holds the prefix.
    assert ranks[:2] == [0, 0]
    assert ranks[2] == 1
    assert ranks.count(1) >= 2
    for rank in (0, 1):
        ids = hub.ranks[rank].requests(ranks.count(rank))
        hub.ranks[rank].finals(ids, [FINAL] * len(ids))
    results = hub.client.wait_results(hub.crids)
    assert {r.routing.reason for r in results if r.rank == 1 and r.routing} == {"spread"}
    assert {r.routing.reason for r in results[:2] if r.routing} == {"match"}


def test_requests_with_different_images_never_attract_each_other(hub: Hub) -> None:
    image_a, image_b = b"\x89PNG image a", b"\x89PNG image b"
    assert not set(keys_of(PREFIX, (image_a,))) & set(keys_of(PREFIX, (image_b,)))
    assert not set(keys_of(PREFIX, (image_a,))) & set(keys_of(PREFIX))
    assert keys_of(PREFIX, (image_a,)) == keys_of(PREFIX, (image_a,))
    hub.report(1, keys_of(PREFIX, (image_a,)))
    hub.wait_held(1, 10)
    for image, reason in ((image_b, "load"), (image_a, "match")):
        result = hub.submit_body(RequestBody(prompt=PREFIX + "describe", images=(image,)))
        assert route(result).reason == reason
        if reason == "match":
            assert result.rank == 1


def test_the_radix_cache_reports_a_key_while_its_tokens_are_cached() -> None:
    freed: list[torch.Tensor] = []
    tracker = CacheKeyTracker()
    tree = RadixCache(freed.append, tracker.untag)
    a = list(range(100, 140))  # two requests sharing 30 tokens
    b = [*range(100, 130), *range(500, 510)]
    tree.insert(a, torch.arange(40))
    tracker.tagged(tree.tag(a, [(1, 10), (2, 30), (3, 40)]))
    assert tracker.take() == ((1, 2, 3), (), False)
    tree.insert(b, torch.arange(40, 80))  # splits a's node at 30: each tag follows its token
    tracker.tagged(tree.tag(b, [(1, 10), (2, 30), (4, 40)]))  # 1 and 2 are on their nodes already
    assert tracker.take() == ((4,), (), False)
    assert tree.evict(10) == 10  # one 10-token leaf (the older: a's tail)
    assert tracker.take() == ((), (3,), False)
    tree.evict(10)
    assert tracker.take() == ((), (4,), False)
    tree.evict(30)
    assert tracker.take() == ((), (1, 2), False)
    assert tracker.counts == {}


def test_the_sdk_sends_keys_and_explains_each_result(deployment_factory: Callable[..., Any]) -> None:
    from dpinfer import InferenceClient

    dep = deployment_factory([0, 1], routing="cache_aware")
    with InferenceClient(dep.address, timeout_s=10) as client:
        (first,) = client.generate([PREFIX + "one"])
        assert first.routing is not None and first.routing.policy == "cache_aware"
        assert first.routing.rank == first.rank
        # The null rank reports what it served; once the hub knows, the prefix follows it.
        dep.client.wait_ranks(lambda s: rank_info(s, first.rank)["prefix_keys"] >= 10, what="report")
        (second,) = client.generate([PREFIX + "two"])
        assert second.rank == first.rank
        assert second.routing is not None
        assert (second.routing.reason, second.routing.matched_chars) == ("match", 1280)
        assert "reason=match" in second.routing.header()


def test_round_robin_results_name_their_policy(deployment: Any) -> None:
    from dpinfer import InferenceClient

    with InferenceClient(deployment.address, timeout_s=10) as client:
        (result,) = client.generate(["hello"])
    assert result.routing is not None
    assert (result.routing.policy, result.routing.rank) == ("round_robin", result.rank)


def test_ranks_map_keys_to_the_tokens_that_cover_them() -> None:
    from dpinfer.config import ModelConfig, RankConfig
    from dpinfer.protocol.local import RawRequest
    from dpinfer.tokenizer.prefix_positions import PositionMapper
    from dpinfer.tokenizer.process import build_parser

    parser = build_parser(RankConfig(model=ModelConfig(model="tiny-llama")))  # a byte tokenizer
    parser.positions = PositionMapper(parser.tokenizer, parser.add_special_tokens)
    text = "é" * 10 + "a" * 300  # two-byte characters: 10 more tokens in the first block
    request = parser.parse(RawRequest(1, False, RequestBody(prompt=text).to_bytes()))
    assert request.cache_keys == tuple(zip(keys_of(text), (138, 266), strict=True))
    chat = RequestBody.from_builtins(
        {"messages": [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "u" * 100}]}
    )
    request = parser.parse(RawRequest(2, False, chat.to_bytes()))
    # Canonical "system\x1f" + content: block 0 ends at content char 121; the template puts
    # "<|system|>" (10 tokens) before it. Block 2 ends in the user turn after its header.
    rendered = parser.tokenizer.apply_chat_template(
        [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "u" * 100}],
        add_generation_prompt=True,
        tokenize=False,
    )
    user_at = rendered.index("u" * 100)  # canonical: the user content starts at 7 + 301 + 5
    assert [n for _, n in request.cache_keys] == [131, 259, user_at + 384 - (7 + 301 + 5)]
    assert [k for k, _ in request.cache_keys] == prefix_keys.body_keys(chat)


def test_status_shows_each_ranks_cache_hit_rate() -> None:
    from dpinfer.client.render import cache_hit

    assert cache_hit({"metrics": {"prefix_cache_hits": 30, "prefix_cache_queries": 40}}) == "75%"
    assert cache_hit({"metrics": {"prefix_cache_hits": 0, "prefix_cache_queries": 0}}) == ""


def test_new_prefixes_go_to_the_rank_caching_least_and_conversations_stay() -> None:
    """Unit: with ties in load, a request whose prefix nobody holds goes to the rank whose
    cache holds the fewest keys, so conversations started while the ranks idle spread."""
    from dpinfer.coordinator.registry import RankPeer
    from dpinfer.coordinator.routing import make_policy

    def peer(rank: int) -> RankPeer:
        msg = protocol.Register(protocol.PROTOCOL_VERSION, rank, 100 + rank, "h", "cpu", "m", 10, 10)
        return RankPeer(f"r{rank}".encode(), msg, 0.0, protocol.EngineState.RUNNING)

    policy = make_policy("cache_aware")
    ranks = [peer(0), peer(1)]
    placed: dict[int, int] = {}
    for conv in range(4):  # one conversation after the other, ranks idle in between
        for turn in range(6):  # each turn resends the conversation so far
            prompt = "".join(f"conversation {conv} turn {t}. " * 8 for t in range(turn + 1))
            keys = keys_of(prompt)
            chosen, info = policy.pick_keyed(ranks, prefix_keys.pack(keys))
            if turn:
                assert (chosen.rank, info.reason) == (placed[conv], "match")
            placed[conv] = chosen.rank
            policy.on_report(chosen, protocol.CacheReport(prefix_keys.pack(keys), b""))
    assert sorted(placed.values()) == [0, 0, 1, 1]


def test_the_rank_main_relays_cache_events_and_resends_them_after_registering() -> None:
    from dpinfer.protocol.local import SetCacheKeys
    from dpinfer.rank.cache_report import CacheReporter

    sent: list[protocol.CacheReport] = []
    told: list[object] = []

    class Tokenizer:
        def send_pyobj(self, obj: object) -> None:
            told.append(obj)

    reporter = CacheReporter(sent.append, Tokenizer())  # type: ignore[arg-type]
    reporter.registered(True)
    assert told == [SetCacheKeys(True)]
    reporter.add(((1, 2, 3), (), False))
    reporter.flush()
    assert [(prefix_keys.unpack(m.inserted), m.reset) for m in sent] == [([1, 2, 3], True)]
    reporter.add(((4,), (2,), False))
    reporter.add(((), (4,), False))  # inserted and evicted before any report: nothing to say
    reporter.flush()
    assert (prefix_keys.unpack(sent[-1].inserted), prefix_keys.unpack(sent[-1].evicted)) == ([], [2])
    reporter.registered(True)  # a new registration: the hub starts empty, gets all that is held
    reporter.flush()
    assert (prefix_keys.unpack(sent[-1].inserted), sent[-1].reset) == ([1, 3], True)
