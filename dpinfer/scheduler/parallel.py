"""Parallel sampling (``SamplingParams.n``): the completions of one prompt share one prefill.

The SDK and the HTTP front send the ``n`` completions of a prompt as ``n`` requests of one
*group* (``RequestBody.group``), which the hub routes to one rank. Here the first member that
admission takes is the group's *leader*; while it prefills, the other members wait (admission
skips them, so later requests pass them). When the leader's prompt is complete, its KV goes
into the radix cache and each waiting member *forks* from it: it locks the same cached prefix,
holds the whole prompt without computing one token of it, and samples its first token from
the leader's last logits with its own sampling parameters and generator. The leader keeps
those logits (one row) while it runs, so a member that reaches the scheduler later (the
tokenizer sends requests one by one) forks from it at the start of the next step. The prompt
is computed once, whatever ``n``; with a seed (member ``j`` samples with ``seed + j``) the
results are the same every time.

A member forks only when its prompt, images and ``prompt_logprobs`` equal the leader's and it
is not a continuation (the group id is the client's word: a hint for scheduling, never trusted
for sharing). When no table row is free or the running batch is full, the remaining members
are admitted later as ordinary requests and read the prompt back from the radix cache (they
compute its last token only). Without the radix cache nothing is shared: every member
prefills its own prompt. A member that moves to another rank (migration) goes on alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dpinfer.scheduler.kv_manager import KVManager
from dpinfer.scheduler.req import Req


class _Prefilled(NamedTuple):
    """A running leader whose prompt is in the tree, and the logits its first token came from."""

    leader: Req
    logits: torch.Tensor
    retractions: int
    """The leader's retractions then: one more means its KV is gone."""

    def forkable(self) -> bool:
        leader = self.leader
        return (
            leader.num_retractions == self.retractions
            and leader.req_pool_idx is not None
            and leader.locked_len == leader.prompt_len
        )


class ParallelGroups:
    """The groups whose members wait for their leader's prefill (one scheduler's)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        """False without the radix cache: nothing can be shared, so nobody waits."""
        self._waiting: dict[int, list[Req]] = {}
        """Group -> members not yet admitted (the leader leaves it when admitted)."""
        self._leaders: dict[int, Req] = {}
        """Group -> the member whose prompt is being prefilled."""
        self._prefilled: dict[int, _Prefilled] = {}
        """Group -> its running leader, prompt in (until the leader finishes)."""
        self.late: list[Req] = []
        """Members that arrived after their leader's prompt was in: they fork next step."""

    def __len__(self) -> int:
        return len(self._waiting) + len(self._leaders) + len(self._prefilled) + len(self.late)

    def add(self, req: Req) -> None:
        """A new request; members of a group wait for (or become) its leader."""
        if not self.enabled or req.group is None or req.output_ids:
            return
        if req.group in self._prefilled:
            self.late.append(req)
        else:
            self._waiting.setdefault(req.group, []).append(req)

    def held(self, req: Req) -> bool:
        """Whether admission must pass ``req`` by: its group's leader is still prefilling."""
        if req.group is None:
            return False
        leader = self._leaders.get(req.group)
        return leader is not None and leader is not req and not leader.prefill_done

    def admitted(self, req: Req) -> None:
        """Admission took ``req`` for an extend step; the group's first becomes its leader."""
        group = req.group
        if group is None or group in self._leaders:
            return
        members = self._waiting.get(group)
        if members is None or req not in members:
            return
        members.remove(req)
        if not members:
            del self._waiting[group]
        self._leaders[group] = req

    def discard(self, req: Req) -> None:
        """``req`` finished or was aborted: it no longer leads or waits."""
        group = req.group
        if group is None:
            return
        if self._leaders.get(group) is req:
            del self._leaders[group]
        prefilled = self._prefilled.get(group)
        if prefilled is not None and prefilled.leader is req:
            del self._prefilled[group]
        if req in self.late:
            self.late.remove(req)
        members = self._waiting.get(group)
        if members is not None and req in members:
            members.remove(req)
            if not members:
                del self._waiting[group]

    def fork(
        self, reqs: list[Req], logits: torch.Tensor, kv: KVManager, room: int
    ) -> tuple[list[Req], torch.Tensor]:
        """Fork the waiting members of every leader in ``reqs`` (requests whose prompt just
        completed, ``logits`` their last rows), at most ``room`` in all.

        Each forked member gets a table row holding its leader's prompt KV, locked in the radix
        cache. Returns ``reqs`` followed by the forked members, and ``logits`` followed by each
        member's leader's row, to sample all first tokens in one call. The caller takes the
        forked members out of the waiting queue.
        """
        forked: list[Req] = []
        rows: list[int] = []
        for i, leader in enumerate(reqs):
            group = leader.group
            if group is None or self._leaders.get(group) is not leader:
                continue
            del self._leaders[group]
            members = self._waiting.pop(group, [])
            if leader.output_ids:
                continue
            kv.cache_unfinished(leader)  # the prompt into the tree, locked by the leader
            self._prefilled[group] = _Prefilled(leader, logits[i].clone(), leader.num_retractions)
            for member in members:
                if room > 0 and _fork(member, leader, kv):
                    forked.append(member)
                    rows.append(i)
                    room -= 1
        if not forked:
            return reqs, logits
        return reqs + forked, torch.cat([logits, logits[rows]])

    def fork_late(self, kv: KVManager, room: int) -> tuple[list[Req], torch.Tensor | None]:
        """Fork the members that arrived after their leader's prompt was in (``late``), at most
        ``room``; returns them and the logits rows to sample their first tokens from. The
        others (their leader is gone or lost its KV) go on as ordinary requests."""
        forked: list[Req] = []
        rows: list[torch.Tensor] = []
        for member in self.late:
            assert member.group is not None
            prefilled = self._prefilled.get(member.group)
            if prefilled is None or not prefilled.forkable():
                continue
            if room > 0 and _fork(member, prefilled.leader, kv):
                forked.append(member)
                rows.append(prefilled.logits)
                room -= 1
        self.late = []
        return forked, torch.stack(rows) if rows else None


def _fork(member: Req, leader: Req, kv: KVManager) -> bool:
    if not _same_prompt(member, leader) or not kv.fork(member, leader):
        return False
    if leader.prompt_logprobs is not None:
        member.prompt_logprobs = list(leader.prompt_logprobs)
    return True


def _same_prompt(member: Req, leader: Req) -> bool:
    return (
        member.req_pool_idx is None
        and not member.output_ids
        and member.mm_hash == leader.mm_hash
        and member.sampling.prompt_logprobs == leader.sampling.prompt_logprobs
        and member.origin_input_ids == leader.origin_input_ids
    )
