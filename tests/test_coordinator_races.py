"""Races the hub must settle with one final per request, each the request's own (issue 9, case 8)."""

from __future__ import annotations

import os
import signal

from wire import live_ranks

from dpinfer import protocol
from dpinfer.client.session import ClientSession


def test_an_aborted_request_whose_rank_dies_before_confirming_ends_aborted(deployment_factory) -> None:
    dep = deployment_factory([0], {0: {"delay_s": 30.0}}, heartbeat_timeout_s=0.6)
    c = dep.client
    (rid,) = c.submit(["abort me"])
    c.wait_ranks(lambda s: s["ranks"][0]["in_flight"] == 1, what="the request on rank 0")
    frozen = dep.ranks[0]
    os.kill(frozen.pid, signal.SIGSTOP)  # the abort reaches a rank that cannot answer it
    try:
        c.abort([rid])
        dep.add_rank(1)  # a live rank the request could wrongly be re-dispatched to
        c.wait_ranks(lambda s: 0 not in live_ranks(s), timeout_s=5, what="rank 0 to be declared dead")
        (result,) = c.wait_results([rid], timeout_s=5)
        assert result.num_finals == 1
        assert result.final.finish_reason == "abort", "an aborted request is never run again elsewhere"
        assert result.final.error_code == protocol.ErrorCode.ABORTED
        assert rank_served(c, 1) == 0
    finally:
        os.kill(frozen.pid, signal.SIGKILL)


def rank_served(client, rank: int) -> int:
    return next(r["completed"] + r["in_flight"] for r in client.status()["ranks"] if r["rank"] == rank)


def test_a_duplicate_request_id_is_refused_and_the_original_goes_on(deployment_factory) -> None:
    dep = deployment_factory([0], {0: {"delay_s": 0.5}})
    c = dep.client
    entry = protocol.SubmitEntry(77, protocol.NO_RANK, False)
    c.send(protocol.Submit((entry,), (protocol.pack_body({"prompt": "original"}),)))
    c.send(protocol.Submit((entry,), (protocol.pack_body({"prompt": "impostor"}),)))
    c.wait_for(lambda: any(e.code == "duplicate_request" for e in c.errors), 5, "the duplicate's error")
    (result,) = c.wait_results([77], timeout_s=5)
    assert result.num_finals == 1 and result.final.text == "echo: original"


def test_the_sdk_keeps_the_original_when_told_of_a_duplicate() -> None:
    session = ClientSession("tcp://127.0.0.1:1", "t")
    rid = session.add(stream=False, rank=None).client_request_id
    error = protocol.Error("duplicate_request", f"request id {rid} is already in flight", rid)
    session.dispatch(protocol.encode(error))
    assert session.is_inflight(rid), "the original request is still awaited"
