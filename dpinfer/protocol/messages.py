"""Every header message: a frozen dataclass per ``Kind``, and the typed entries of batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from dpinfer.protocol.kinds import NO_REQUEST, EngineState, Kind, Signal
from dpinfer.protocol.route_info import RouteInfo

# ---------------------------------------------------------------------------- entries


class SubmitEntry(NamedTuple):
    client_request_id: int
    rank: int  # NO_RANK: the routing policy picks; otherwise pin to this rank id
    stream: bool
    prefix_keys: bytes = b""  # the body's ``protocol.prefix_keys``, packed (cache_aware reads them)
    group: int = 0  # not 0: one of the n completions of a prompt; the hub sends the group to one rank


class RequestEntry(NamedTuple):
    request_id: int
    stream: bool


class EngineOutputEntry(NamedTuple):
    request_id: int
    final: bool
    num_tokens: int  # tokens generated so far; > 0 means the client has seen output


class OutputEntry(NamedTuple):
    client_request_id: int
    final: bool
    rank: int
    routing: RouteInfo | None = None  # cache_aware: why it went to ``rank`` (finals, a stream's first)


class RankAck(NamedTuple):
    """One rank's answer to a control signal (by its scheduler, its stopping rank main, or the hub
    for a rank that died or never answered), carried whole inside ``ControlAcknowledgement``."""

    rank: int
    ok: bool
    state: EngineState
    """The rank's state afterwards (when it did not answer: its state when the signal was sent)."""
    error: str = ""


class ControlAcknowledgement(NamedTuple):
    """The service's answer to a control signal, in aggregate and per rank (public as
    ``dpinfer.ControlAcknowledgement``).

    ``signal`` is the name the caller sent; ``state`` the deployment's state afterwards (or its
    unchanged state if refused); ``ok`` is true when the transition was valid and every live
    rank acknowledged it; ``acks`` holds one ``RankAck`` per rank; ``error`` says why it was
    refused or failed (it names the current state for invalid transitions).
    """

    signal: str
    state: EngineState
    ok: bool
    acks: tuple[RankAck, ...] = ()
    error: str = ""


class LoadStats(NamedTuple):
    """A rank's load: measured by its scheduler, sent in heartbeats, shown by ``dpinfer status``.

    Routing never uses these figures (they may be up to a heartbeat old); it uses the
    coordinator's own exact in-flight counts.
    """

    num_waiting: int = 0
    num_running: int = 0
    kv_used_tokens: int = 0
    """Slots held by requests (cached prefixes in use included)."""
    kv_free_tokens: int = 0
    """Slots free now or reclaimable by evicting unused cached prefixes."""
    kv_capacity_tokens: int = 0


TIME_TO_FIRST_TOKEN_EDGES_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_EDGES_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_EDGES_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
"""Histogram bucket upper edges, in seconds: vLLM's, so its dashboards adapt with a rename."""


class Histogram(NamedTuple):
    """Cumulative since the rank started, as Prometheus keeps one: ``buckets[i]`` counts the
    observations <= the metric's ``i``-th edge (``HISTOGRAM_EDGES``); ``num_observations``
    counts them all (the ``+Inf`` bucket) and ``sum`` adds them up."""

    buckets: tuple[int, ...]
    sum: float = 0.0
    num_observations: int = 0


class FinishCounts(NamedTuple):
    """Requests finished, by ``FinishReason`` value (one field per reason)."""

    stop: int = 0
    length: int = 0
    abort: int = 0
    error: int = 0


class RankMetrics(NamedTuple):
    """A rank's request figures, cumulative since it started: made by its scheduler (where
    every request passes, whichever client sent it), sent in heartbeats whole, shown by
    ``dpinfer status --json``, ``dpinfer top`` and ``/metrics``.

    Times are measured from the scheduler's receipt of a request: queue time until it is
    first scheduled, time to first token until its first token is sampled, inter-token
    latency between consecutive tokens, end-to-end until it finishes (every finished
    request, errors and aborts included; the others only when they happened).
    """

    prompt_tokens: int = 0
    """Prompt tokens of the requests scheduled (counted when first scheduled)."""
    generation_tokens: int = 0
    """Tokens sampled (a stop token that ends a request included)."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache when first scheduled."""
    prefix_cache_hits: int = 0
    """Of those, tokens whose KV came from the cache."""
    num_preemptions: int = 0
    """Retractions: a running request's KV given back to make room; it is prefilled again."""
    finished: FinishCounts = FinishCounts()
    time_to_first_token_seconds: Histogram = Histogram((0,) * len(TIME_TO_FIRST_TOKEN_EDGES_S))
    inter_token_latency_seconds: Histogram = Histogram((0,) * len(INTER_TOKEN_LATENCY_EDGES_S))
    e2e_request_latency_seconds: Histogram = Histogram((0,) * len(REQUEST_LATENCY_EDGES_S))
    request_queue_time_seconds: Histogram = Histogram((0,) * len(REQUEST_LATENCY_EDGES_S))

    def is_consistent(self) -> bool:
        """Every histogram has one bucket per edge, in non-decreasing order, within its count."""
        for name, edges in HISTOGRAM_EDGES.items():
            h: Histogram = getattr(self, name)
            if len(h.buckets) != len(edges) or list(h.buckets) != sorted(h.buckets):
                return False
            if h.buckets and h.buckets[-1] > h.num_observations:
                return False
        return True

    def as_map(self) -> dict[str, object]:
        """Plain data for the STATUS map: histograms as ``{le, buckets, sum, count}``."""
        out: dict[str, object] = {name: getattr(self, name) for name in _COUNTER_FIELDS}
        out["finished"] = self.finished._asdict()
        for name, edges in HISTOGRAM_EDGES.items():
            h: Histogram = getattr(self, name)
            buckets, count = list(h.buckets), h.num_observations
            out[name] = {"le": list(edges), "buckets": buckets, "sum": h.sum, "count": count}
        return out


NO_METRICS = RankMetrics()
"""What a rank without a scheduler (a null rank, or one just started) reports."""

HISTOGRAM_EDGES: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": TIME_TO_FIRST_TOKEN_EDGES_S,
    "inter_token_latency_seconds": INTER_TOKEN_LATENCY_EDGES_S,
    "e2e_request_latency_seconds": REQUEST_LATENCY_EDGES_S,
    "request_queue_time_seconds": REQUEST_LATENCY_EDGES_S,
}
"""``RankMetrics`` histogram field -> its bucket edges (never sent: both ends know them)."""
_COUNTER_FIELDS = (
    "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
)  # fmt: skip


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every header message. ``bodies`` holds the opaque frames after the header."""

    KIND: ClassVar[Kind]
    HAS_BODIES: ClassVar[bool] = False


# client -> coordinator


@dataclass(frozen=True, slots=True)
class ClientHello(Message):
    KIND = Kind.CLIENT_HELLO
    version: int
    client_name: str


@dataclass(frozen=True, slots=True)
class Submit(Message):
    KIND = Kind.SUBMIT
    HAS_BODIES = True
    entries: tuple[SubmitEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Abort(Message):
    KIND = Kind.ABORT
    client_request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Control(Message):
    KIND = Kind.CONTROL
    control_id: int
    signal: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StatusQuery(Message):
    KIND = Kind.STATUS
    query_id: int


@dataclass(frozen=True, slots=True)
class ClientBye(Message):
    KIND = Kind.CLIENT_BYE


# coordinator -> client


@dataclass(frozen=True, slots=True)
class HelloAck(Message):
    """The answer to every ``ClientHello`` (a client repeats it as its keepalive).

    ``incarnation`` names this coordinator process (random, new at every start).
    ``known`` is false when the coordinator did not know this client: its first hello, or
    the coordinator restarted, or it forgot the client (silent past ``client_timeout_s``, or
    disconnected for not reading) and aborted its requests. A client that gets ``known``
    false with requests in flight resubmits them (the coordinator refuses, with
    ``duplicate_request``, any it still has). ``client_timeout_s`` tells the client how often
    it must be heard from.
    """

    KIND = Kind.HELLO_ACK
    version: int
    state: EngineState
    num_ranks: int
    incarnation: int = 0
    known: bool = False
    client_timeout_s: float = 30.0
    routing: str = ""  # the routing policy, for ``GenerationResult.routing``


@dataclass(frozen=True, slots=True)
class Outputs(Message):
    KIND = Kind.OUTPUTS
    HAS_BODIES = True
    entries: tuple[OutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlReply(Message):
    """``control_id`` is the caller's; ``ack`` is what the caller gets, as is."""

    KIND = Kind.CONTROL_REPLY
    control_id: int
    ack: ControlAcknowledgement


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """``bodies[0]`` is a msgpack map: state, ranks (list of maps), totals, counters."""

    KIND = Kind.STATUS_REPLY
    HAS_BODIES = True
    query_id: int
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A protocol-level error (not handshaken, malformed frame, unknown request...)."""

    KIND = Kind.ERROR
    code: str
    message: str
    client_request_id: int = NO_REQUEST


@dataclass(frozen=True, slots=True)
class Notice(Message):
    """Unsolicited news for a client, e.g. ``code="shutdown"`` before the coordinator exits."""

    KIND = Kind.NOTICE
    code: str
    message: str


# engine rank -> coordinator


@dataclass(frozen=True, slots=True)
class Register(Message):
    KIND = Kind.REGISTER
    version: int
    rank: int
    pid: int
    host: str
    device: str
    model: str
    max_prompt_len: int
    kv_capacity_tokens: int
    max_in_flight: int = 0
    """The rank's credit: most requests it takes at once (0: no limit). The coordinator keeps the
    excess in its own bounded queue, where routing can still place it on any rank."""


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    KIND = Kind.HEARTBEAT
    load: LoadStats
    state: EngineState
    metrics: RankMetrics = NO_METRICS


@dataclass(frozen=True, slots=True)
class EngineOutputs(Message):
    KIND = Kind.ENGINE_OUTPUTS
    HAS_BODIES = True
    entries: tuple[EngineOutputEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlAck(Message):
    """A rank's acknowledgement of ``EngineControl(control_id, signal)``; the scheduler makes it."""

    KIND = Kind.CONTROL_ACK
    control_id: int
    signal: Signal
    ack: RankAck


@dataclass(frozen=True, slots=True)
class Deregister(Message):
    """A rank leaving on purpose. After a STOP nothing is re-dispatched; with ``handoff`` (the
    rank was told to terminate on its own) its requests continue on other ranks, migrated
    like those of a dead rank, and what it still sends for them is dropped."""

    KIND = Kind.DEREGISTER
    reason: str
    handoff: bool = False


# coordinator -> engine rank


@dataclass(frozen=True, slots=True)
class RegisterAck(Message):
    """``incarnation`` as in ``HelloAck``: a rank registered again with a different one drops
    everything it held for the old coordinator (whose request ids mean nothing now)."""

    KIND = Kind.REGISTER_ACK
    rank: int
    state: EngineState
    heartbeat_interval_s: float
    incarnation: int = 0
    cache_reports: bool = False  # send ``CacheReport``s: the hub routes ``cache_aware``


@dataclass(frozen=True, slots=True)
class Requests(Message):
    KIND = Kind.REQUESTS
    HAS_BODIES = True
    entries: tuple[RequestEntry, ...]
    bodies: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineAbort(Message):
    KIND = Kind.ENGINE_ABORT
    request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EngineControl(Message):
    """A control signal for one rank; the rank main hands this very value to its scheduler."""

    KIND = Kind.ENGINE_CONTROL
    control_id: int
    signal: Signal
    args: dict[str, Any]
