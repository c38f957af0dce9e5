"""Request metrics: the recorder's counters and histograms, the scheduler's figures on tiny-llama,
the value on the wire, and ``/metrics`` rendered from a status map (parsed with prometheus'
own parser)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dpinfer import protocol
from dpinfer.config import ModelConfig, SchedulerConfig
from dpinfer.coordinator.registry import RankPeer
from dpinfer.http.metrics import CONTENT_TYPE, render_metrics
from dpinfer.protocol.local import SchedulerOutput, TokenizedRequest
from dpinfer.protocol.messages import (
    HISTOGRAM_EDGES,
    NO_METRICS,
    REQUEST_LATENCY_EDGES_S,
    FinishCounts,
    Histogram,
    RankMetrics,
)
from dpinfer.runner.model_runner import ModelRunner
from dpinfer.sampling import SamplingParams
from dpinfer.scheduler.metrics import HistogramRecorder, MetricsRecorder
from dpinfer.scheduler.scheduler import Scheduler

REQUEST_HISTOGRAMS = (
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
)


# ---------------------------------------------------------------------------- the recorder


def test_histogram_buckets_are_cumulative_upper_bounds_like_prometheus() -> None:
    h = HistogramRecorder((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 5.0):  # 0.1 is on an edge: it belongs to le="0.1"
        h.observe(value)
    assert h.snapshot() == Histogram((2, 3), 5.65, 4)


def test_the_recorder_follows_one_request_through_its_life() -> None:
    r = MetricsRecorder()
    r.arrived(7, now=10.0)
    r.scheduled(7, prompt_len=12, cached_len=4, now=10.5)
    r.token(7, now=11.0)
    r.retracted()
    r.scheduled(7, prompt_len=12, cached_len=12, now=11.1)  # re-admitted: counted once only
    r.token(7, now=11.25)
    r.token(7, now=11.5)
    r.finished_request(7, "length", now=11.5)
    r.rejected()
    m = r.snapshot()
    assert (m.prompt_tokens, m.prefix_cache_queries, m.prefix_cache_hits) == (12, 12, 4)
    assert (m.generation_tokens, m.num_preemptions, m.finished) == (3, 1, FinishCounts(length=1, error=1))
    assert m.request_queue_time_seconds.num_observations == 1 and m.request_queue_time_seconds.sum == 0.5
    assert m.time_to_first_token_seconds.sum == 1.0 and m.time_to_first_token_seconds.num_observations == 1
    assert m.inter_token_latency_seconds.sum == 0.5 and m.inter_token_latency_seconds.num_observations == 2
    e2e = m.e2e_request_latency_seconds
    assert (e2e.num_observations, e2e.sum) == (2, 1.5), "the rejected request ends at once"
    assert e2e.buckets[REQUEST_LATENCY_EDGES_S.index(0.3)] == 1 and e2e.buckets[-1] == 2
    assert m.is_consistent()


def test_metrics_travel_whole_in_a_heartbeat_and_a_broken_value_is_not_kept() -> None:
    r = MetricsRecorder()
    r.arrived(1, 0.0)
    r.finished_request(1, "abort", 3.0)
    figures = r.snapshot()
    msg = protocol.Heartbeat(protocol.LoadStats(0, 1, 2, 3, 5), protocol.EngineState.RUNNING, figures)
    assert protocol.decode(protocol.encode(msg)) == msg
    assert (
        protocol.decode(protocol.encode(protocol.Heartbeat(protocol.LoadStats(), "running"))).metrics
        == NO_METRICS
    )
    register = protocol.Register(protocol.PROTOCOL_VERSION, 0, 1, "h", "cpu", "m", 8, 16)
    peer = RankPeer(b"r0", register, 0.0, protocol.EngineState.RUNNING)
    peer.on_heartbeat(msg, 1.0)
    assert peer.metrics == figures and peer.describe(1.0)["metrics"]["finished"]["abort"] == 1
    short = figures._replace(e2e_request_latency_seconds=Histogram((1,), 3.0, 1))
    peer.on_heartbeat(protocol.Heartbeat(msg.load, msg.state, short), 2.0)
    assert peer.metrics == figures, "a histogram without one bucket per edge is refused"


# ---------------------------------------------------------------------------- the scheduler


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    torch.set_num_threads(1)
    yield ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=4096, max_running_requests=16))


def run_all(s: Scheduler, requests: list[TokenizedRequest]) -> dict[int, list[SchedulerOutput]]:
    """Every output of each request, once the scheduler has nothing left to do."""
    outputs: dict[int, list[SchedulerOutput]] = {}
    for req in requests:
        for o in s.add_request(req):
            outputs.setdefault(o.request_id, []).append(o)
    for _ in range(5000):
        if not s.has_work:
            return outputs
        for o in s.step():
            outputs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the scheduler did not finish")


def test_scheduler_figures_are_exact_for_k_requests(runner: ModelRunner) -> None:
    s = Scheduler(runner, SchedulerConfig(max_kv_tokens=4096, max_running_requests=16))
    k, n = 5, 6
    prompt = [(3 * j) % 200 + 3 for j in range(40)]
    sampling = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    first = [TokenizedRequest(i, [*prompt, i + 5], sampling) for i in range(k)]
    outputs = run_all(s, first)
    second = [TokenizedRequest(100 + i, [*prompt, i + 5], sampling, stream=True) for i in range(k)]
    outputs.update(run_all(s, second))
    s.add_request(TokenizedRequest(200, prompt, sampling))
    s.abort_request(200)
    m = s.metrics()
    done = 2 * k
    assert m.finished == FinishCounts(length=done, abort=1)
    assert (
        m.generation_tokens
        == done * n
        == sum(len(o.new_token_ids) for outs in outputs.values() for o in outs)
    )
    assert m.prompt_tokens == m.prefix_cache_queries == done * (len(prompt) + 1)
    assert m.prefix_cache_hits == sum(outs[-1].cached_len for outs in outputs.values()) > 0, (
        "the second wave hits"
    )
    for name in REQUEST_HISTOGRAMS:
        expected = done + 1 if name == "e2e_request_latency_seconds" else done  # the abort ends too
        assert getattr(m, name).num_observations == expected, name
    assert m.inter_token_latency_seconds.num_observations == done * (n - 1)
    assert m.num_preemptions == 0 and m.is_consistent()


def test_retracted_requests_count_once_and_preemptions_match() -> None:
    k, n, pool = 6, 40, 12 + 40 + 24
    small = ModelRunner(ModelConfig(), SchedulerConfig(max_kv_tokens=pool, max_running_requests=8))
    s = Scheduler(small, SchedulerConfig(max_kv_tokens=pool, max_running_requests=8))
    s.new_token_ratio = 0.0  # admit optimistically so decode runs out of slots
    sampling = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    reqs = [TokenizedRequest(i, [(7 * i + j) % 200 + 3 for j in range(12)], sampling) for i in range(k)]
    run_all(s, reqs)
    m = s.metrics()
    assert s.num_retractions > 0, "the pool was small enough to force retractions"
    assert m.num_preemptions == s.num_retractions
    assert m.finished.length == k and m.generation_tokens == k * n
    assert all(getattr(m, name).num_observations == k for name in REQUEST_HISTOGRAMS)
    assert m.prompt_tokens == k * 12, "a re-admitted request's prompt is not counted again"


# ---------------------------------------------------------------------------- /metrics


def status_map(figures: RankMetrics, *, alive: bool = True) -> dict[str, Any]:
    rank = {"rank": 0, "model": "tiny-llama", "alive": alive, "num_running": 2, "num_waiting": 3,
            "kv_used_tokens": 25, "kv_capacity_tokens": 100, "in_flight": 5, "routed": 9,
            "metrics": figures.as_map()}  # fmt: skip
    return {
        "state": "running",
        "ranks": [rank, {**rank, "rank": 1, "alive": False, "routed": 1, "metrics": NO_METRICS.as_map()}],
        "totals": {"live_ranks": 1, "clients": 2, "in_flight": 5, "pending": 0},
        "counters": {"redispatched": 2, "rank_deaths": 1, "error_replies": {"malformed": 3},
                     "control_signals": {"pause": 2}, "control_failures": {"pause": 1}},
    }  # fmt: skip


def parse(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    base = name
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        base = base.removesuffix(suffix)
    family = families[base]
    values = [s.value for s in family.samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(values) == 1, (name, labels, family.samples)
    return values[0]


def test_render_metrics_parses_with_prometheus_own_parser() -> None:
    r = MetricsRecorder()
    for i, ttft in enumerate((0.003, 0.03, 3.0)):
        r.arrived(i, 0.0)
        r.scheduled(i, 10, 4, 0.001)
        r.token(i, ttft)
        r.token(i, ttft + 0.02)
        r.finished_request(i, "stop", ttft + 0.02)
    f = parse(render_metrics(status_map(r.snapshot())))
    assert CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST
    assert f["dpinfer:time_to_first_token_seconds"].type == "histogram"
    assert f["dpinfer:prompt_tokens"].type == "counter" and f["dpinfer:kv_cache_usage_perc"].type == "gauge"
    zero = {"rank": "0", "model_name": "tiny-llama"}
    assert sample(f, "dpinfer:time_to_first_token_seconds_count", **zero) == 3
    assert sample(f, "dpinfer:time_to_first_token_seconds_bucket", le="0.005", **zero) == 1
    assert sample(f, "dpinfer:time_to_first_token_seconds_bucket", le="0.04", **zero) == 2
    assert sample(f, "dpinfer:time_to_first_token_seconds_bucket", le="+Inf", **zero) == 3
    assert sample(f, "dpinfer:time_to_first_token_seconds_sum", **zero) == pytest.approx(3.033)
    assert sample(f, "dpinfer:inter_token_latency_seconds_count", **zero) == 3
    for name in HISTOGRAM_EDGES:
        buckets = [
            s for s in f[f"dpinfer:{name}"].samples if s.name.endswith("_bucket") and s.labels["rank"] == "0"
        ]
        assert len(buckets) == len(HISTOGRAM_EDGES[name]) + 1, name
    assert sample(f, "dpinfer:request_success_total", finished_reason="stop", **zero) == 3
    assert sample(f, "dpinfer:request_success_total", finished_reason="length", **zero) == 0
    assert sample(f, "dpinfer:prompt_tokens_total", **zero) == 30
    assert sample(f, "dpinfer:prefix_cache_hits_total", **zero) == 12
    assert sample(f, "dpinfer:generation_tokens_total", **zero) == 6
    assert sample(f, "dpinfer:kv_cache_usage_perc", **zero) == 0.25
    assert sample(f, "dpinfer:num_requests_waiting", **zero) == 3
    assert sample(f, "dpinfer:requests_routed_total", rank="1") == 1
    assert sample(f, "dpinfer:rank_alive", rank="1") == 0
    assert all(s.labels["rank"] == "0" for s in f["dpinfer:num_requests_running"].samples), (
        "no gauges of dead ranks"
    )
    assert sample(f, "dpinfer:coordinator_redispatched_total") == 2
    assert sample(f, "dpinfer:coordinator_rank_deaths_total") == 1
    assert sample(f, "dpinfer:coordinator_error_replies_total", code="malformed") == 3
    assert sample(f, "dpinfer:coordinator_control_signals_total", signal="pause") == 2
    assert sample(f, "dpinfer:coordinator_control_failures_total", signal="pause") == 1
    assert sample(f, "dpinfer:coordinator_live_ranks") == 1


def test_each_render_stands_alone_and_odd_maps_never_raise() -> None:
    one = RankMetrics(generation_tokens=5)
    first = render_metrics(status_map(one))
    render_metrics(status_map(RankMetrics(generation_tokens=99)))
    assert render_metrics(status_map(one)) == first, "no state is kept between renders"
    assert b"dpinfer:generation_tokens" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
    for odd in ({}, {"ranks": "x"}, {"ranks": [{"rank": 3, "metrics": {"finished": 4}}], "counters": []}):
        assert parse(render_metrics(odd))["dpinfer:coordinator_live_ranks"].samples[0].value == 0
