"""The rank main's book of in-flight requests and its STOP plan (pure logic, no I/O).

Invariant: every request the rank accepted gets exactly one final reply. A request is in
flight from the moment the rank main forwards it to the tokenizer until a final output
for it passes through the rank main (or the rank main writes one itself: STOP deadline
overrun, a dead child). Outputs for requests no longer in flight are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dpinfer.protocol import EngineOutputEntry, FinishReason, Signal, error_body

DEFAULT_STOP_DEADLINE_S = 60.0
"""How long a draining STOP waits for running requests before aborting them."""
ABORT_GRACE_S = 5.0
"""After aborting, how long to wait for the scheduler's abort replies before writing our own."""


class InFlight:
    """request_id -> tokens generated so far (as last forwarded upstream)."""

    def __init__(self) -> None:
        self._num_tokens: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._num_tokens)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._num_tokens

    def ids(self) -> tuple[int, ...]:
        return tuple(self._num_tokens)

    def add(self, request_id: int) -> bool:
        """Track a new request; False if it is already in flight (a duplicate id)."""
        if request_id in self._num_tokens:
            return False
        self._num_tokens[request_id] = 0
        return True

    def filter_outputs(
        self, entries: tuple[EngineOutputEntry, ...], bodies: tuple[bytes, ...]
    ) -> tuple[list[EngineOutputEntry], list[bytes]]:
        """Keep the outputs of in-flight requests; a final one ends its request."""
        keep_entries: list[EngineOutputEntry] = []
        keep_bodies: list[bytes] = []
        for entry, body in zip(entries, bodies, strict=True):
            if entry.request_id not in self._num_tokens:
                continue
            if entry.final:
                del self._num_tokens[entry.request_id]
            else:
                self._num_tokens[entry.request_id] = entry.num_tokens
            keep_entries.append(entry)
            keep_bodies.append(body)
        return keep_entries, keep_bodies

    def fail_all(
        self, message: str, reason: FinishReason = FinishReason.ERROR
    ) -> tuple[list[EngineOutputEntry], list[bytes]]:
        """Final replies for every request still in flight; afterwards none is."""
        entries = [EngineOutputEntry(rid, True, n) for rid, n in self._num_tokens.items()]
        bodies = [error_body(message, reason) for _ in entries]
        self._num_tokens.clear()
        return entries, bodies

    def clear(self) -> None:
        self._num_tokens.clear()


@dataclass
class StopPlan:
    """A STOP (or SHUTDOWN, or a termination signal) in progress."""

    drain: bool
    deadline: float
    """Monotonic time at which a draining stop aborts what is left."""
    control_ids: list[tuple[int, Signal]] = field(default_factory=list)
    """(control_id, signal) to acknowledge once every request has its final reply."""
    abort_sent_at: float | None = None

    @classmethod
    def start(cls, drain: bool, deadline_s: float) -> StopPlan:
        now = time.monotonic()
        return cls(drain=drain, deadline=now + (deadline_s if drain else 0.0))

    def seconds_until_next_action(self) -> float:
        now = time.monotonic()
        if self.abort_sent_at is None:
            return max(0.0, self.deadline - now)
        return max(0.0, self.abort_sent_at + ABORT_GRACE_S - now)

    def should_abort(self) -> bool:
        return self.abort_sent_at is None and time.monotonic() >= self.deadline

    def abort_grace_over(self) -> bool:
        return self.abort_sent_at is not None and time.monotonic() >= self.abort_sent_at + ABORT_GRACE_S
