"""Admission: which waiting requests join the next prefill (extend) step.

Two budgets, both in tokens:

- the *chunk* budget: what the step's token budget (``max_prefill_tokens``) leaves after the
  running requests' decode tokens (mixed steps, see ``scheduler.py``); a prompt longer than
  what is left is cut into chunks (one chunked request at a time, continued first next step);
- the *total* budget: slots available (free, or evictable from the prefix cache) minus
  what admitted requests are expected to still need — the rest of their prompt plus their
  remaining ``max_new_tokens`` scaled by ``new_token_ratio`` (most requests stop early).
  Over-commitment is repaired by retraction during decode.

Requests are taken first come, first served; admission stops at the first one that does
not fit, so a large request is never starved by smaller ones behind it. With nothing else
running, the head request is admitted with whatever fits: it can always finish alone,
because prompt + output is capped at the pool size (``max_context_len``).

One exception to the order (SGLang's in-batch prefix deprioritisation): a request that
shares at least ``IN_BATCH_PREFIX_MIN`` uncached tokens with a request admitted in the same
step is deferred by one step, so it reuses that request's KV through the radix cache
instead of computing the same prefix twice.
"""

from __future__ import annotations

import enum
import math

from dpinfer.runner.radix_cache import common_prefix_len
from dpinfer.scheduler.kv_manager import KVManager
from dpinfer.scheduler.req import Req

CLIP_MAX_NEW_TOKENS = 4096
"""Cap on one request's reserved future tokens, so huge ``max_new_tokens`` do not block admission."""
IN_BATCH_PREFIX_MIN = 32


class AddResult(enum.Enum):
    ADMITTED = "admitted"
    DEFERRED = "deferred"
    """Left waiting for one step (shares a prefix with a request admitted now); keep going."""
    NO_ROOM = "no_room"
    """Left waiting; stop admitting this step."""


def reserved_tokens(req: Req, new_token_ratio: float) -> int:
    """Slots ``req`` is expected to still need for generation."""
    return math.ceil(min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * new_token_ratio)


class PrefillAdder:
    """Builds the list of requests of one extend step, allocating their slots as it goes."""

    def __init__(
        self,
        kv: KVManager,
        running: list[Req],
        max_prefill_tokens: int,
        max_running_requests: int,
        new_token_ratio: float,
    ) -> None:
        self.kv = kv
        self.ratio = new_token_ratio
        self.rem_chunk = max_prefill_tokens
        self.slots_left = max_running_requests - len(running)
        self.reserved = sum(reserved_tokens(r, new_token_ratio) for r in running)
        self.alone = not running
        self.reqs: list[Req] = []
        self.new_chunked: Req | None = None

    def add_chunked(self, req: Req) -> None:
        """Continue the request whose prompt was cut last step (it already holds a row)."""
        self.slots_left -= 1
        req.extend_len = 0
        n = min(req.fill_len - req.kv_len, self.rem_chunk, self.kv.available)
        if n > 0 and self.kv.alloc_extend(req, n):
            self._take(req, n)
        self.alone = False
        self.reserved += req.fill_len - req.kv_len - req.extend_len + reserved_tokens(req, self.ratio)

    def add_one(self, req: Req) -> AddResult:
        """Admit ``req``, defer it by one step, or leave it waiting and stop (see ``AddResult``)."""
        if self.rem_chunk <= 0 or self.slots_left <= 0 or self.new_chunked is not None:
            return AddResult.NO_ROOM
        if not self.kv.admit(req):
            return AddResult.NO_ROOM
        if self.kv.tree is not None and self._shares_with_batch(req):
            self.kv.release(req)
            return AddResult.DEFERRED
        remaining = req.fill_len - req.kv_len
        future = reserved_tokens(req, self.ratio)
        room = self.kv.available - self.reserved
        if self.alone:
            n = min(remaining, self.rem_chunk, self.kv.available)
        elif remaining + future <= room:
            n = min(remaining, self.rem_chunk)
        else:
            n = 0
        if n <= 0 or not self.kv.alloc_extend(req, n):
            self.kv.release(req)
            return AddResult.NO_ROOM
        req.admitted_once = True
        self.slots_left -= 1
        self.alone = False
        self.reserved += remaining - n + future
        self._take(req, n)
        if n < remaining:
            self.new_chunked = req
        return AddResult.ADMITTED

    def _shares_with_batch(self, req: Req) -> bool:
        fill = req.fill_ids
        for other in self.reqs:
            if other.mm_hash != req.mm_hash:
                continue
            shared = common_prefix_len(other.fill_ids, fill)
            if shared - req.kv_len >= IN_BATCH_PREFIX_MIN:
                return True
        return False

    def _take(self, req: Req, n: int) -> None:
        req.extend_len = n
        self.rem_chunk -= n
        self.reqs.append(req)
