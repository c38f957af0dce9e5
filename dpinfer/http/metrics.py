"""``/metrics``: the deployment's figures as Prometheus text, rendered from the STATUS map.

Every figure is measured where every request passes -- the ranks' schedulers
(``protocol.RankMetrics``, one per rank, sent whole in heartbeats) and the coordinator (its
counters and per-rank counts) -- and reaches an API worker in the coordinator's status map.
An API worker measures nothing itself, so any number of them serve the same figures, and a
request counts once whether it came over HTTP or through the SDK. Names follow vLLM's with the
``dpinfer:`` prefix; the list (name, type, labels, meaning) is in docs/architecture.md,
"Metrics".

``render_metrics`` builds the families on a fresh ``CollectorRegistry`` per call from one
status map: no global state, so no last-writer-wins between workers or ranks.
``prometheus_client`` is imported on first use (it costs ~80 ms).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
"""``prometheus_client.CONTENT_TYPE_LATEST`` (a test keeps them equal)."""

PREFIX = "dpinfer:"

_RANK_COUNTERS = (
    ("prompt_tokens", "Prompt tokens of the requests scheduled."),
    ("generation_tokens", "Tokens generated."),
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache."),
    ("num_preemptions", "Running requests retracted to make room in the KV cache (recomputed later)."),
)
_RANK_HISTOGRAMS = (
    ("time_to_first_token_seconds", "From the scheduler's receipt of a request to its first token."),
    ("inter_token_latency_seconds", "Between consecutive tokens of a request."),
    ("e2e_request_latency_seconds", "From the scheduler's receipt of a request to its end."),
    ("request_queue_time_seconds", "From the scheduler's receipt of a request to its first scheduling."),
)
_COORDINATOR_LABELLED = (
    ("error_replies", "code", "Error replies the coordinator sent, by code."),
    ("control_signals", "signal", "Control signals the coordinator answered, by signal."),
    ("control_failures", "signal", "Control signals refused or failed, by signal."),
)


def render_metrics(status: Mapping[str, object]) -> bytes:
    """The Prometheus text exposition of one coordinator status map (``dpinfer status --json``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)


class _StatusCollector:
    """A custom collector over one status map (``collect`` is all prometheus_client needs)."""

    def __init__(self, status: Mapping[str, object]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        ranks = [r for r in _list(self.status.get("ranks")) if isinstance(r, Mapping)]
        yield from _rank_families(ranks)
        yield from _coordinator_families(self.status)


def _rank_families(ranks: Sequence[Mapping[str, object]]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    labels = ["rank", "model_name"]
    keyed = [([str(r.get("rank")), str(r.get("model", ""))], r) for r in ranks]
    live = [(key, r) for key, r in keyed if r.get("alive") is True]

    alive = GaugeMetricFamily(
        PREFIX + "rank_alive", "1 while the rank is registered and live.", labels=labels
    )
    running = GaugeMetricFamily(
        PREFIX + "num_requests_running", "Requests in model execution batches.", labels=labels
    )
    waiting = GaugeMetricFamily(
        PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", labels=labels
    )
    kv_usage = GaugeMetricFamily(
        PREFIX + "kv_cache_usage_perc", "KV cache usage, 1 means 100 percent.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        PREFIX + "requests_in_flight",
        "Requests the coordinator sent to the rank, not yet finished.",
        labels=labels,
    )
    for key, r in keyed:
        alive.add_metric(key, 1.0 if r.get("alive") is True else 0.0)
    for key, r in live:
        running.add_metric(key, _num(r.get("num_running")))
        waiting.add_metric(key, _num(r.get("num_waiting")))
        capacity = _num(r.get("kv_capacity_tokens"))
        kv_usage.add_metric(key, _num(r.get("kv_used_tokens")) / capacity if capacity > 0 else 0.0)
        in_flight.add_metric(key, _num(r.get("in_flight")))
    yield from (alive, running, waiting, kv_usage, in_flight)

    routed = CounterMetricFamily(
        PREFIX + "requests_routed", "Requests the coordinator sent to the rank.", labels=labels
    )
    for key, r in keyed:
        routed.add_metric(key, _num(r.get("routed")))
    yield routed
    for name, doc in _RANK_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
        for key, r in keyed:
            family.add_metric(key, _num(_map(r.get("metrics")).get(name)))
        yield family
    success = CounterMetricFamily(
        PREFIX + "request_success",
        "Requests finished, by finish reason.",
        labels=[*labels, "finished_reason"],
    )
    for key, r in keyed:
        for reason, count in _map(_map(r.get("metrics")).get("finished")).items():
            success.add_metric([*key, str(reason)], _num(count))
    yield success
    for name, doc in _RANK_HISTOGRAMS:
        histogram = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
        for key, r in keyed:
            h = _map(_map(r.get("metrics")).get(name))
            edges, buckets = _list(h.get("le")), _list(h.get("buckets"))
            if len(edges) != len(buckets):
                continue
            pairs = [(floatToGoString(_num(e)), _num(b)) for e, b in zip(edges, buckets, strict=True)]
            pairs.append(("+Inf", _num(h.get("count"))))
            histogram.add_metric(key, pairs, sum_value=_num(h.get("sum")))
        yield histogram


def _coordinator_families(status: Mapping[str, object]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    totals = _map(status.get("totals"))
    for key, doc in (
        ("live_ranks", "Ranks registered and live."),
        ("clients", "Clients connected to the coordinator (API workers included)."),
        ("in_flight", "Requests in the coordinator, routed or pending."),
        ("pending", "Requests waiting for a live rank."),
    ):
        yield GaugeMetricFamily(PREFIX + f"coordinator_{key}", doc, value=_num(totals.get(key)))
    counters = _map(status.get("counters"))
    for key, value in counters.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            doc = f"The coordinator's {str(key).replace('_', ' ')} counter (see dpinfer status)."
            yield CounterMetricFamily(PREFIX + f"coordinator_{key}", doc, value=value)
    for key, label, doc in _COORDINATOR_LABELLED:
        family = CounterMetricFamily(PREFIX + f"coordinator_{key}", doc, labels=[label])
        for name, count in _map(counters.get(key)).items():
            family.add_metric([str(name)], _num(count))
        yield family


def _map(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[object]:
    return value if isinstance(value, list | tuple) else ()


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)
