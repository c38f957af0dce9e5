"""``MetricsRecorder``: a rank's request figures, recorded where every request passes.

The scheduler calls it at each event of a request's life (arrival, first scheduled, each
sampled token, finish, retraction) with the time of that event, and ``snapshot()`` makes the
one ``protocol.RankMetrics`` value that travels whole to the coordinator in heartbeats.
Everything is cumulative since the scheduler started, so a late or lost heartbeat loses
nothing: the next one carries it. Per token it costs one dict lookup and one bisect.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

from dpinfer.protocol import FinishReason
from dpinfer.protocol.messages import (
    INTER_TOKEN_LATENCY_EDGES_S,
    REQUEST_LATENCY_EDGES_S,
    TIME_TO_FIRST_TOKEN_EDGES_S,
    FinishCounts,
    Histogram,
    RankMetrics,
)

_REASONS = tuple(FinishCounts._fields)
assert set(_REASONS) == {r.value for r in FinishReason}, "one FinishCounts field per FinishReason"


class HistogramRecorder:
    """Observations into fixed buckets (``edges`` are upper bounds, Prometheus ``le``)."""

    __slots__ = ("counts", "edges", "num_observations", "sum")

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.edges = edges
        self.counts = [0] * (len(edges) + 1)
        """Per bucket, not cumulative; the last one is above every edge."""
        self.sum = 0.0
        self.num_observations = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.edges, value)] += 1
        self.sum += value
        self.num_observations += 1

    def snapshot(self) -> Histogram:
        return Histogram(tuple(accumulate(self.counts[:-1])), self.sum, self.num_observations)


class _Times:
    """One live request's timestamps (``time.monotonic()`` seconds)."""

    __slots__ = ("arrived", "last_token", "scheduled")

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.scheduled: float | None = None
        self.last_token: float | None = None


class MetricsRecorder:
    """The scheduler's request figures; see the module docstring."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.finished = dict.fromkeys(_REASONS, 0)
        self.time_to_first_token = HistogramRecorder(TIME_TO_FIRST_TOKEN_EDGES_S)
        self.inter_token_latency = HistogramRecorder(INTER_TOKEN_LATENCY_EDGES_S)
        self.e2e_request_latency = HistogramRecorder(REQUEST_LATENCY_EDGES_S)
        self.request_queue_time = HistogramRecorder(REQUEST_LATENCY_EDGES_S)
        self._live: dict[int, _Times] = {}

    def arrived(self, request_id: int, now: float) -> None:
        self._live[request_id] = _Times(now)

    def scheduled(self, request_id: int, prompt_len: int, cached_len: int, now: float) -> None:
        """A request joins an extend step; only its first time counts (not after a retraction)."""
        times = self._live[request_id]
        if times.scheduled is not None:
            return
        times.scheduled = now
        self.request_queue_time.observe(now - times.arrived)
        self.prompt_tokens += prompt_len
        self.prefix_cache_queries += prompt_len
        self.prefix_cache_hits += cached_len

    def token(self, request_id: int, now: float) -> None:
        """A token was sampled for the request."""
        times = self._live[request_id]
        last = times.last_token
        if last is None:
            self.time_to_first_token.observe(now - times.arrived)
        else:
            self.inter_token_latency.observe(now - last)
        times.last_token = now
        self.generation_tokens += 1

    def retracted(self) -> None:
        self.num_preemptions += 1

    def finished_request(self, request_id: int, reason: str, now: float) -> None:
        times = self._live.pop(request_id)
        self.e2e_request_latency.observe(now - times.arrived)
        self.finished[reason] += 1

    def rejected(self) -> None:
        """A request refused on arrival (it can never run): finished at once, with an error."""
        self.e2e_request_latency.observe(0.0)
        self.finished[FinishReason.ERROR.value] += 1

    def snapshot(self) -> RankMetrics:
        return RankMetrics(
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            finished=FinishCounts(**self.finished),
            time_to_first_token_seconds=self.time_to_first_token.snapshot(),
            inter_token_latency_seconds=self.inter_token_latency.snapshot(),
            e2e_request_latency_seconds=self.e2e_request_latency.snapshot(),
            request_queue_time_seconds=self.request_queue_time.snapshot(),
        )
