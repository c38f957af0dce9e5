"""What a chaos run does: its options (``ChaosConfig``) and the fault schedule drawn from its seed.

The schedule is a pure function of the seed, the fault kinds and the deployment's shape:
rounds in which every chosen kind appears once, in a seeded order, each fault after a seeded
pause. A fault that kills a rank process (the rank main, or its scheduler child) uses one of
that rank's restarts, so it targets only ranks with restarts left; once none has any, those
kinds drop out and the other kinds go on. (While a rank restarts, the run lets such a fault
wait and injects the next ones first, so a slow model load never stalls the schedule.)
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from dpinfer.config import ConfigError


class FaultKind(enum.StrEnum):
    KILL_RANK = "kill_rank"
    """SIGKILL a rank main process (its torchrun worker's supervisor restarts it)."""
    STOP_RANK = "stop_rank"
    """SIGSTOP a rank (main and children) past the heartbeat timeout, then SIGCONT it."""
    KILL_SCHEDULER = "kill_scheduler"
    """SIGKILL a rank's scheduler child (the rank ends and is restarted)."""
    KILL_COORDINATOR = "kill_coordinator"
    """SIGKILL the coordinator and start it again at the same address."""
    VANISH_CLIENT = "vanish_client"
    """A client that goes away mid-request: a client process SIGKILLed while it streams, or a
    raw DEALER socket that submits and closes without reading."""
    FLOOD = "flood"
    """Clients that submit beyond --max-client-requests and --max-queued-requests at once."""


RESTARTING_KINDS = frozenset({FaultKind.KILL_RANK, FaultKind.KILL_SCHEDULER})
"""Kinds that end a rank process, so the rank comes back only by a restart."""
VANISH_VARIANTS = ("process", "socket")


def parse_faults(text: str) -> tuple[FaultKind, ...]:
    """``"kill_rank,flood"`` -> the kinds, in the order of ``FaultKind``; ``"all"`` or "" is every kind."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == ["all"]:
        return tuple(FaultKind)
    unknown = [n for n in names if n not in FaultKind.__members__.values()]
    if unknown:
        valid = ", ".join(k.value for k in FaultKind)
        raise ConfigError(f"--faults: {', '.join(unknown)} not one of: {valid}")
    return tuple(k for k in FaultKind if k.value in names)


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = 60.0
    """How long faults are injected and the workload runs (start-up and the reference pass not counted)."""
    seed: int = 0
    faults: tuple[FaultKind, ...] = tuple(FaultKind)
    model: str = "tiny-llama"
    dp: int = 2
    max_restarts: int = 1
    concurrency: int = 8
    """Workload requests kept in flight."""
    deadline_s: float = 30.0
    """No request may take longer than this from submission to its final reply."""
    gap_s: tuple[float, float] = (1.0, 3.0)
    """The pause before each fault is drawn uniformly from this range."""
    max_hub_rss_bytes: int = 300 << 20
    max_rank_growth_bytes: int = 256 << 20
    """A rank's processes (main and children) may grow this much past their first sample."""
    heartbeat_timeout_s: float = 1.5
    client_timeout_s: float = 5.0
    max_queued_requests: int = 64
    max_client_requests: int = 24
    flood_clients: int = 3
    flood_excess: int = 16
    """Each flood client submits --max-client-requests plus this many at once."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ConfigError(f"--duration must be > 0, got {self.duration_s}")
        if self.dp < 1:
            raise ConfigError(f"--dp must be >= 1, got {self.dp}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"--seed must be in 0..2**64-1, got {self.seed}")
        if self.deadline_s <= 0:
            raise ConfigError(f"--deadline-s must be > 0, got {self.deadline_s}")


@dataclass(frozen=True)
class PlannedFault:
    kind: FaultKind
    gap_s: float
    """Pause before injecting it (after the previous fault has resolved)."""
    rank: int
    """The target rank (unused by the coordinator and client kinds)."""
    variant: str = ""
    """For ``vanish_client``: ``process`` or ``socket``."""


def draw_schedule(
    seed: int,
    kinds: tuple[FaultKind, ...],
    dp: int,
    max_restarts: int,
    gap_s: tuple[float, float] = (1.0, 3.0),
    length: int = 200,
) -> list[PlannedFault]:
    """Up to ``length`` faults; the run takes them in order until its duration is over."""
    rng = random.Random(seed)
    restarts_left = dict.fromkeys(range(dp), max_restarts)
    schedule: list[PlannedFault] = []
    while len(schedule) < length:
        round_kinds = list(kinds)
        rng.shuffle(round_kinds)
        drawn = 0
        for kind in round_kinds:
            if kind in RESTARTING_KINDS:
                candidates = [r for r, left in restarts_left.items() if left > 0]
                if not candidates:
                    continue
                rank = rng.choice(candidates)
                restarts_left[rank] -= 1
            else:
                rank = rng.randrange(dp)
            variant = rng.choice(VANISH_VARIANTS) if kind is FaultKind.VANISH_CLIENT else ""
            schedule.append(PlannedFault(kind, round(rng.uniform(*gap_s), 3), rank, variant))
            drawn += 1
        if drawn == 0:
            break
    return schedule[:length]
