"""The invariants of a chaos run, as pure functions of what the run recorded.

Each returns a ``Check`` (name, ok, detail); the detail names the first offending requests, so
a failure says what broke. The request checks take nothing but ``RequestRecord`` values, so
they are tested on synthetic records as well as run on real ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpinfer.chaos.workload import FLOOD, GREEDY, Reference, RequestRecord, RequestSpec

OVERLOADED = "overloaded"
FINISH_REASONS = ("stop", "length", "abort", "error")
SHOWN = 3
"""Offending requests named in a detail."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_map(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _who(record: RequestRecord) -> str:
    how = "streamed" if record.stream else "whole"
    return f"#{record.request_id} of {record.client_name} ({record.spec.kind}, {how})"


def _verdict(name: str, problems: list[str], checked: int, what: str) -> Check:
    if not problems:
        return Check(name, True, f"{checked} {what}")
    shown = "; ".join(problems[:SHOWN]) + (
        f"; ... {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    )
    return Check(name, False, f"{len(problems)} of {checked}: {shown}")


def ending_problem(record: RequestRecord) -> str | None:
    """Why ``record`` did not end exactly once with its own result or an explicit error, or None."""
    if record.finals == 0:
        return "never ended"
    if record.finals > 1:
        return f"ended {record.finals} times"
    if record.wire_finals > 1:
        return f"{record.wire_finals} finals reached the client"
    if record.finish_reason not in FINISH_REASONS:
        return f"finish reason {record.finish_reason!r}"
    if record.finish_reason == "abort" and not record.aborted_by_harness:
        return f"ended 'abort' though nobody aborted it ({record.error})"
    if record.finish_reason == "error" and not record.error_code:
        return f"an error without a code ({record.error})"
    return None


def check_ended_once(records: Sequence[RequestRecord], foreign_finals: int = 0) -> Check:
    problems = [f"{_who(r)}: {why}" for r in records if (why := ending_problem(r)) is not None]
    if foreign_finals:
        problems.append(f"{foreign_finals} final(s) for request ids the client never sent")
    return _verdict("every request ended exactly once", problems, len(records), "requests, one final each")


def check_no_failures(records: Sequence[RequestRecord]) -> Check:
    """Callers see latency, not errors: everything ends with its result or, beyond a limit, ``overloaded``."""
    failed = [r for r in records if r.finals and not r.ok and r.error_code != OVERLOADED]
    if not failed:
        return Check("no request failed by a fault", True, f"{len(records)} requests: results or overloaded")
    codes = Counter(r.error_code or r.finish_reason or "?" for r in failed)
    by_code = ", ".join(f"{code} {n}" for code, n in codes.most_common())
    example = f"{_who(failed[0])}: {failed[0].error}"
    return Check(
        "no request failed by a fault", False, f"{len(failed)} of {len(records)} ({by_code}); e.g. {example}"
    )


def check_greedy(records: Sequence[RequestRecord], references: Mapping[RequestSpec, Reference]) -> Check:
    """Greedy and seeded requests give their undisturbed output, moved or resubmitted or not
    (a continuation draws on where the moved request stopped)."""
    greedy = [r for r in records if (r.spec.kind == GREEDY or r.spec.seed is not None) and r.ok]
    problems = []
    for record in greedy:
        reference = references.get(record.spec)
        if reference is None:
            problems.append(f"{_who(record)}: no reference")
        elif record.token_ids != reference.token_ids or record.text != reference.text:
            at = _first_difference(record.token_ids, reference.token_ids)
            problems.append(f"{_who(record)} on rank {record.rank}: differs from token {at}")
    return _verdict(
        "greedy and seeded outputs equal the reference", problems, len(greedy), "results equal theirs"
    )


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_streams(records: Sequence[RequestRecord]) -> Check:
    """A streamed result is its deltas put together: no token or character lost or repeated."""
    streamed = [r for r in records if r.stream and r.ok]
    problems = [
        f"{_who(r)}: deltas give {len(r.streamed_token_ids)} tokens, the result {len(r.token_ids)}"
        for r in streamed
        if "".join(r.streamed_text) != r.text or tuple(r.streamed_token_ids) != r.token_ids
    ]
    return _verdict("streams whole (deltas = result)", problems, len(streamed), "streams whole")


def check_deadlines(records: Sequence[RequestRecord]) -> Check:
    problems = [
        f"{_who(r)}: "
        + ("no final at all" if r.latency_s is None else f"{r.latency_s:.1f} s > {r.deadline_s:g} s")
        for r in records
        if r.latency_s is None or r.latency_s > r.deadline_s
    ]
    longest = max((r.latency_s for r in records if r.latency_s is not None), default=0.0)
    check = _verdict("no request waited past its deadline", problems, len(records), "within their deadline")
    return Check(check.name, check.ok, f"{check.detail} (longest {longest:.1f} s)")


def check_requests(
    records: Sequence[RequestRecord], references: Mapping[RequestSpec, Reference], foreign_finals: int = 0
) -> list[Check]:
    return [
        check_ended_once(records, foreign_finals),
        check_greedy(records, references),
        check_streams(records),
        check_deadlines(records),
        check_no_failures(records),
    ]


def check_floods(records: Iterable[RequestRecord], expected: int) -> Check:
    overloaded = sum(1 for r in records if r.spec.kind == FLOOD and r.error_code == OVERLOADED)
    return Check(
        "floods beyond the limits answered 'overloaded'",
        overloaded >= expected,
        f"{overloaded} overloaded replies to flood requests (their excess over the client limit: {expected})",
    )


def check_vanished(
    forgotten: Sequence[bool], clients: int | None, in_flight: int | None, expected_clients: int
) -> Check:
    """Each vanished client was forgotten by the hub soon after it went; at the end (the run's own
    requests done) the hub holds no client but the harness's and no request."""
    ok = all(forgotten) and clients == expected_clients and in_flight == 0
    return Check(
        "vanished clients forgotten, their requests aborted",
        ok,
        f"{sum(forgotten)} of {len(forgotten)} forgotten within the client timeout; at the end the hub "
        f"holds {clients} client(s) (expected {expected_clients}), {in_flight} request(s) in flight",
    )


def check_leftovers(leftovers: Mapping[str, Sequence[str]]) -> Check:
    left = {kind: list(items) for kind, items in leftovers.items() if items}
    if not left:
        return Check("nothing left after shutdown", True, "no process, shared-memory segment or ipc file")
    shown = "; ".join(
        f"{kind}: {', '.join(items[:4])}" + (" ..." if len(items) > 4 else "") for kind, items in left.items()
    )
    return Check("nothing left after shutdown", False, shown)


def check_memory(hub_peak: int, rank_growth: int, max_hub: int, max_growth: int) -> Check:
    ok = 0 < hub_peak <= max_hub and rank_growth <= max_growth
    return Check(
        "hub and rank memory bounded",
        ok,
        f"hub peak {hub_peak / 2**20:.0f} MB (bound {max_hub / 2**20:.0f}), "
        f"rank growth {rank_growth / 2**20:.0f} MB (bound {max_growth / 2**20:.0f})",
    )


def check_recovered(outcomes: Sequence[Any]) -> Check:
    stuck = [o for o in outcomes if not o.recovered]
    if not stuck:
        return Check("the deployment recovered from every fault", True, f"{len(outcomes)} fault(s)")
    return Check("the deployment recovered from every fault", False, f"{stuck[0].kind}: {stuck[0].detail}")
