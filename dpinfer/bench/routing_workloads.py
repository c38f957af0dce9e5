"""The seeded workloads of ``dpinfer bench routing``: who sends what, and when.

A workload is a list of sessions, each starting at a fixed time (a fixed arrival rate,
evenly spaced); a session is one request, or (``multi_turn``) a conversation whose every
turn resends the whole conversation so far once the previous turn finished. Prompt lengths
are in characters; the built-in tiny models have a byte tokenizer (one token per ASCII
character), so characters are tokens there.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

WORKLOADS = ("shared_prefix", "multi_turn", "uniform", "hot_prefix")
HOT_RATE_FACTOR = 8
"""hot_prefix must saturate one rank (arrive faster than the rank holding the prefix serves
them alone, so its in-flight count climbs): 96 requests/s at the default rate, where one
tiny-llama rank serves a cached 1,000-token prefix plus 8 tokens in about 50 ms."""


@dataclass(frozen=True)
class Scale:
    """The knobs every workload derives its size from (the issue's sizes at ``scale`` 1)."""

    scale: float = 1.0
    """Fraction of the issue's request counts (1.0: 8 groups x 16, 16 conversations of 6
    turns, 64 uniform and 64 hot-prefix requests). Below 1, a group's cold first request
    weighs more in TTFT p90 (at 0.5 it is 1 in 8: the p90 lands on one)."""
    prefix_chars: int = 1000
    output_tokens: int = 8
    rate: float = 12.0
    """Arrivals per second of new sessions (hot_prefix: ``HOT_RATE_FACTOR`` times this). The
    default loads round_robin on two tiny-llama ranks with one thread each past what they keep
    up with."""
    seed: int = 0


@dataclass
class Session:
    start_s: float
    turns: list[str]
    """One prompt (single-turn), or the user messages of a conversation."""
    chat: bool = False
    system: str = ""


def _text(rng: random.Random, n: int) -> str:
    words = []
    size = 0
    while size < n:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:n]


def _spaced(sessions: list[Session], rate: float) -> list[Session]:
    for i, s in enumerate(sessions):
        s.start_s = i / rate
    return sessions


def build(name: str, scale: Scale) -> list[Session]:
    rng = random.Random(f"{name}-{scale.seed}")
    if name == "shared_prefix":
        groups, per_group = 8, max(2, round(16 * scale.scale))
        prefixes = [_text(rng, scale.prefix_chars) for _ in range(groups)]
        sessions = [Session(0.0, [p + " Q: " + _text(rng, 24)]) for p in prefixes for _ in range(per_group)]
        rng.shuffle(sessions)
        return _spaced(sessions, scale.rate)
    if name == "multi_turn":
        conversations, turns = max(2, round(16 * scale.scale)), 6
        sessions = [
            Session(0.0, [_text(rng, 160) for _ in range(turns)], chat=True, system=_text(rng, 200))
            for _ in range(conversations)
        ]
        return _spaced(sessions, scale.rate / turns * 2)
    if name == "uniform":
        count = max(4, round(64 * scale.scale))
        sessions = [Session(0.0, [_text(rng, scale.prefix_chars // 2)]) for _ in range(count)]
        return _spaced(sessions, scale.rate)
    if name == "hot_prefix":
        count = max(4, round(64 * scale.scale))
        prefix = _text(rng, scale.prefix_chars)
        sessions = [Session(0.0, [prefix + " Q: " + _text(rng, 24)]) for _ in range(count)]
        return _spaced(sessions, scale.rate * HOT_RATE_FACTOR)
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
