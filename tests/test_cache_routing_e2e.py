"""cache_aware end to end: a real tiny-llama rank reports what its radix cache holds and evicts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from test_engine_e2e import RankProcess, short_tmpdir, start_rank, wait_rank_live
from wire import Result, WireClient, rank_info

from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.process import start_coordinator
from dpinfer.protocol import prefix_keys
from dpinfer.protocol.bodies import RequestBody

pytestmark = pytest.mark.timeout(300)

PREFIX = "".join(f"a shared system prompt, line {i:03d}. " for i in range(40))[:1280]  # 10 keys
OTHER = "".join(f"an unrelated long document, part {i:03d}. " for i in range(50))[:1792]  # 14 keys
SAMPLING = {"max_new_tokens": 2, "temperature": 0.0}


def keys_of(prompt: str) -> set[int]:
    return set(prefix_keys.body_keys(RequestBody(prompt=prompt)))


def ask(client: WireClient, prompt: str) -> Result:
    (crid,) = client.submit([prompt], sampling=SAMPLING, keys=True)
    (result,) = client.wait_results([crid], timeout_s=120)
    assert result.final is not None and result.final.finish_reason == "length", result.final
    return result


@pytest.fixture(scope="module")
def stack() -> Iterator[WireClient]:
    handle = start_coordinator(CoordinatorConfig(port=0, routing="cache_aware"))  # type: ignore[arg-type]
    workdir = short_tmpdir()
    rank: RankProcess | None = None
    client = WireClient(handle.address)
    try:
        # 2,048 KV tokens: the 1,280-token prefix and the 1,792-token document do not fit together.
        rank = start_rank(handle.address, workdir)
        wait_rank_live(client, rank)
        yield client
    finally:
        client.close()
        handle.stop(timeout_s=10)
        if rank is not None:
            rank.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_real_rank_reports_its_prefix_cache_and_its_evictions(stack: WireClient) -> None:
    client = stack
    first = ask(client, PREFIX + " Q: one")
    assert first.routing is not None and first.routing.reason == "load"
    client.wait_ranks(lambda s: rank_info(s, 0)["prefix_keys"] >= 10, what="the prefix's report")
    second = ask(client, PREFIX + " Q: two")
    assert second.routing is not None
    assert (second.routing.reason, second.routing.matched_chars) == ("match", 1280)
    assert second.final is not None and second.final.cached_tokens >= 1280
    # A long unrelated prompt needs the prefix's slots: the rank evicts it and says so.
    ask(client, OTHER)
    status = client.wait_ranks(
        lambda s: rank_info(s, 0)["prefix_keys"] == len(keys_of(OTHER)), what="the eviction's report"
    )
    assert rank_info(status, 0)["prefix_keys"] == 14
    third = ask(client, PREFIX + " Q: three")
    assert third.routing is not None and (third.routing.reason, third.routing.matched_chars) == ("load", 0)
