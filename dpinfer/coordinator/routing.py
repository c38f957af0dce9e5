"""Routing policies: which live rank gets the next request.

Add a policy by subclassing ``RoutingPolicy`` and decorating it with ``@register_policy``;
``make_policy(name)`` builds one by name (a bad name lists the valid ones). The names match
``config.RoutingPolicyName``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from dpinfer.config import ConfigError
from dpinfer.coordinator.registry import RankPeer


class RoutingPolicy:
    """Picks the rank for one request.

    Contract:

    - ``pick(ranks)`` gets the live ranks, non-empty, in a stable order (registration order,
      or rank id order under ``--deterministic``) and returns one of them. It runs on the hot
      path once per request: O(len(ranks)), no I/O, no logging, no allocation worth noting.
    - It must not mutate the peers. It may read ``RankPeer.in_flight`` (the coordinator's
      exact count of requests sent to that rank and not yet finished: queued plus running)
      and the last heartbeat's load figures (informational, possibly stale).
    - Given the same sequence of calls with the same ranks and loads it returns the same
      sequence of ranks (``--deterministic`` relies on this); it may keep a cursor.
    """

    name: ClassVar[str]

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        raise NotImplementedError


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str) -> RoutingPolicy:
    """A new policy instance; ``ConfigError`` naming the valid policies for an unknown name."""
    cls = POLICIES.get(str(name))
    if cls is None:
        raise ConfigError(f"--routing: {name!r} is not one of: {', '.join(sorted(POLICIES))}")
    return cls()


@register_policy
class RoundRobin(RoutingPolicy):
    """Each request to the next rank in order (the default)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        cursor = self._cursor
        self._cursor = cursor + 1
        return ranks[cursor % len(ranks)]


@register_policy
class LeastLoaded(RoutingPolicy):
    """The rank with the fewest in-flight requests; ties go to the next rank in rotation.

    Rotating tie-breaks keep low load spread (a lowest-index tie-break would send every
    request to the first rank whenever all are idle). Load is the coordinator's exact
    ``in_flight`` count, never a late heartbeat figure.
    """

    name = "least_loaded"

    def __init__(self) -> None:
        self._cursor = 0

    def pick(self, ranks: Sequence[RankPeer]) -> RankPeer:
        n = len(ranks)
        start = self._cursor % n
        best_index = start
        best_load = ranks[start].in_flight
        for offset in range(1, n):
            i = (start + offset) % n
            load = ranks[i].in_flight
            if load < best_load:
                best_index, best_load = i, load
        self._cursor = best_index + 1
        return ranks[best_index]
