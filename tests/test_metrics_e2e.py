"""Metrics end to end: one real rank (tiny-llama on CPU) behind a real coordinator. After K
requests through the SDK (batched and streamed), the next heartbeat carries exactly K in each
request histogram and the right counters, and ``/metrics``, ``dpinfer status --json`` and
``dpinfer top --once`` show the same figures."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from test_engine_e2e import short_tmpdir, start_rank, wait_rank_live
from wire import WireClient

from dpinfer import InferenceClient, SamplingParams, protocol
from dpinfer.cli import cli
from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.process import start_coordinator
from dpinfer.errors import DpinferError
from dpinfer.http.metrics import render_metrics

pytestmark = pytest.mark.timeout(240)

K, N = 6, 5  # requests, tokens each
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    workdir = short_tmpdir()
    coordinator = start_coordinator(CoordinatorConfig(port=0, heartbeat_interval_s=0.1))
    rank = start_rank(coordinator.address, workdir)
    wire = WireClient(coordinator.address)
    try:
        wait_rank_live(wire, rank)
        yield coordinator.address
    finally:
        wire.close()
        rank.kill()
        coordinator.stop(timeout_s=5)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_status(client: InferenceClient, done: Any, what: str) -> dict[str, Any]:
    """Poll the status until ``done(status)`` (the next heartbeat carries the figures)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = client.status()
        if done(status):
            return status
        assert time.monotonic() < deadline, f"no heartbeat with {what}: {status['ranks']}"
        threading.Event().wait(0.05)  # a heartbeat is due every 0.1 s


def test_k_requests_count_exactly_k_everywhere(address: str) -> None:
    sampling = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
    prompt = "the same long prefix for every request, so the cache hits: "
    with InferenceClient(address) as client:
        results = client.generate([prompt + str(i) for i in range(K - 2)], sampling)
        for i in range(2):
            deltas = list(client.generate_stream(prompt + f"stream {i}", sampling))
            results.append(deltas[-1].result)
        assert all(r is not None and r.completion_tokens == N for r in results)
        with pytest.raises(DpinferError):
            client.unpause_engines()  # invalid while running: answered, and counted as failed
        bad = WireClient(address, hello=False)
        bad.send(protocol.StatusQuery(1))  # not handshaken: an error reply
        bad.wait_for(lambda: bool(bad.errors), 5.0, "an error reply")
        bad.close()
        status = wait_status(client, lambda s: finished(s) == K, f"{K} finished requests")

    rank = status["ranks"][0]
    m = rank["metrics"]
    assert m["finished"] == {"stop": 0, "length": K, "abort": 0, "error": 0}
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        h = m[name]
        assert h["count"] == K and h["buckets"][-1] <= K and len(h["buckets"]) == len(h["le"]), name
        assert h["sum"] > 0, name
    assert m["inter_token_latency_seconds"]["count"] == K * (N - 1)
    assert m["generation_tokens"] == K * N == sum(r.completion_tokens for r in results)
    assert m["prompt_tokens"] == m["prefix_cache_queries"] == sum(r.prompt_tokens for r in results)
    assert m["prefix_cache_hits"] == sum(r.cached_tokens for r in results) > 0
    assert rank["routed"] == K and status["counters"]["completed"] == K
    counters = status["counters"]
    assert counters["control_signals"] == {"unpause": 1} and counters["control_failures"] == {"unpause": 1}
    assert counters["error_replies"].get("not_handshaken") == 1

    families = {f.name: f for f in text_string_to_metric_families(render_metrics(status).decode())}
    e2e = [s for s in families["dpinfer:e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels["rank"], s.value) for s in e2e] == [("0", K)]
    routed = families["dpinfer:requests_routed"].samples
    assert [(s.labels["rank"], s.value) for s in routed if s.name.endswith("_total")] == [("0", K)]

    as_json = json.loads(invoke("status", "--json", "--address", address))
    assert as_json["ranks"][0]["metrics"] == m, "dpinfer status --json carries the same figures"
    frame = invoke("top", "--once", "--address", address)
    row = next(line for line in frame.splitlines() if line.startswith("│    0 "))
    assert f"│ {K:>8} │" in row and " ms " in row, frame


def finished(status: dict[str, Any]) -> int:
    ranks = status["ranks"]
    return sum(ranks[0]["metrics"]["finished"].values()) if ranks else 0


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout
