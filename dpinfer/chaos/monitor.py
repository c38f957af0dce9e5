"""``Monitor``: what the run watches while faults happen.

Every ``interval_s`` it asks the coordinator for its status (the counters of each coordinator
incarnation are kept apart, so a restarted hub starting again from zero loses nothing that was
read before the kill), remembers every process below the deployment, and samples resident
memory from ``/proc/<pid>/status``: the hub's, and each rank's (its main process plus its
children) against that rank process's first sample.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from dpinfer.chaos import proc
from dpinfer.chaos.cluster import Cluster

MIGRATION_COUNTERS = ("migrated", "migrations")
RESUBMISSION_COUNTERS = ("resubmitted", "resubmissions", "resubmits")
"""The coordinator counter names the figures look for (the first one present is used)."""


@dataclass
class RankMemory:
    rank: int
    pid: int
    first_bytes: int
    peak_bytes: int

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.first_bytes


@dataclass
class Monitor:
    cluster: Cluster
    interval_s: float = 0.5
    hub_peak_bytes: int = 0
    ranks: dict[int, RankMemory] = field(default_factory=dict)
    """By rank process id: one entry per incarnation of each rank."""
    last_status: dict[str, Any] | None = None
    _counters: dict[int, dict[str, int]] = field(default_factory=dict)
    """Coordinator incarnation (its start number) -> its last counters read."""

    async def poll(self) -> dict[str, Any] | None:
        incarnation = self.cluster.coordinator_starts
        status = await self.cluster.link.status(timeout_s=2.0)
        children = self.cluster.remember()
        self._sample_memory(status, children)
        if status is not None and incarnation == self.cluster.coordinator_starts:
            self.last_status = status
            self._counters[incarnation] = _flatten(status.get("counters", {}))
        return status

    def _sample_memory(self, status: dict[str, Any] | None, children: dict[int, list[int]]) -> None:
        hub = self.cluster.coordinator
        if hub is not None and hub.poll() is None:
            self.hub_peak_bytes = max(self.hub_peak_bytes, proc.rss_bytes(hub.pid))
        for rank in (status or {}).get("ranks", []):
            pid = rank.get("pid")
            if not rank.get("alive") or not isinstance(pid, int) or not proc.alive(pid):
                continue
            rss = sum(proc.rss_bytes(p) for p in self.cluster.rank_tree(pid, children))
            memory = self.ranks.get(pid)
            if memory is None:
                self.ranks[pid] = RankMemory(int(rank["rank"]), pid, rss, rss)
            else:
                memory.peak_bytes = max(memory.peak_bytes, rss)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    def counter(self, *names: str) -> int | None:
        """The first of ``names`` the coordinator reports, summed over its incarnations; None if none is."""
        for name in names:
            values = [c[name] for c in self._counters.values() if name in c]
            if values:
                return sum(values)
        return None

    @property
    def counter_names(self) -> set[str]:
        return {name for c in self._counters.values() for name in c}

    @property
    def rank_peak_bytes(self) -> int:
        return max((m.peak_bytes for m in self.ranks.values()), default=0)

    @property
    def rank_growth_bytes(self) -> int:
        return max((m.growth_bytes for m in self.ranks.values()), default=0)


def _flatten(counters: dict[str, Any]) -> dict[str, int]:
    """Scalar counters as they are; per-code maps as ``name.code`` (``error_replies.overloaded``)."""
    flat: dict[str, int] = {}
    for name, value in counters.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, int)})
    return flat
