"""Who owns which KV slot: requests, the prefix cache, or the free list.

``KVManager`` is the only code that moves slots between the three. Invariant (checked by
``check_invariants`` in tests): every slot is exactly one of free, owned by the radix tree,
or owned by one request (``req_to_token[row, locked_len:kv_len]``).
"""

from __future__ import annotations

import torch

from dpinfer.runner.model_runner import ModelRunner
from dpinfer.runner.radix_cache import RadixCache
from dpinfer.scheduler.cache_keys import CacheKeyTracker
from dpinfer.scheduler.req import Req


class KVManager:
    """Slot bookkeeping for requests on top of the runner's pools (radix cache optional)."""

    def __init__(self, runner: ModelRunner, enable_radix_cache: bool) -> None:
        self.allocator = runner.allocator
        self.rows = runner.req_to_token_pool
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.num_slots = runner.num_slots
        self.cache_keys = CacheKeyTracker()
        """The routing keys the tree holds (cache-aware routing's reports)."""
        self.tree: RadixCache | None = (
            RadixCache(self.allocator.free, self.cache_keys.untag) if enable_radix_cache else None
        )
        # A new manager owns every slot of the runner (a runner may outlive a scheduler).
        self.allocator.clear()
        self.rows.clear()

    @property
    def available(self) -> int:
        """Slots that can be handed out now: free, or held only by unused cached prefixes."""
        return self.allocator.num_free + (self.tree.evictable_size if self.tree else 0)

    @property
    def evictable(self) -> int:
        return self.tree.evictable_size if self.tree else 0

    def alloc_slots(self, n: int) -> torch.Tensor | None:
        """``n`` slots, evicting cached prefixes if needed; ``None`` (nothing taken) if impossible."""
        short = n - self.allocator.num_free
        if short > 0 and self.tree is not None:
            self.tree.evict(short)
        return self.allocator.alloc(n)

    # ------------------------------------------------------------------ admission

    def admit(self, req: Req) -> bool:
        """Give ``req`` a table row and its cached prefix (locked). False if no row is free."""
        row = self.rows.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        if self.tree is not None:
            # Leave at least one token to compute: its logits give the next token. Prompt
            # logprobs need the logits of every prompt token: nothing cached is read then.
            key = [] if req.needs_prompt_logprobs else req.fill_ids[: req.fill_len - 1]
            slots, node = self.tree.match_prefix(key, req.mm_hash)
            self.tree.inc_lock_ref(node)
            req.last_node = node
            req.kv_len = req.locked_len = len(slots)
            if len(slots):
                self.req_to_token[row, : len(slots)] = slots
        if not req.admitted_once:
            req.cached_len = min(req.kv_len, req.prompt_len)
        return True

    def fork(self, req: Req, parent: Req) -> bool:
        """Give ``req`` a table row holding ``parent``'s prompt KV, which the prefix cache holds
        (``parent`` locks it; ``req`` locks it too). False if no row is free."""
        assert self.tree is not None and parent.last_node is not None and parent.req_pool_idx is not None
        assert parent.locked_len == parent.prompt_len, "the parent's prompt is in the tree"
        row = self.rows.alloc()
        if row is None:
            return False
        n = parent.prompt_len
        self.req_to_token[row, :n] = self.req_to_token[parent.req_pool_idx, :n]
        self.tree.inc_lock_ref(parent.last_node)
        req.req_pool_idx, req.last_node = row, parent.last_node
        req.kv_len = req.locked_len = req.cached_len = n  # the same prompt: all of it cached
        req.admitted_once = True
        return True

    def alloc_extend(self, req: Req, n: int) -> bool:
        """Slots for the next ``n`` tokens of ``req`` (written into its row)."""
        assert req.req_pool_idx is not None
        slots = self.alloc_slots(n)
        if slots is None:
            return False
        self.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        return True

    # ------------------------------------------------------------------ caching / release

    def cache_unfinished(self, req: Req) -> None:
        """Share ``req``'s computed KV through the tree while it keeps running (lock moves down)."""
        if self.tree is None or req.kv_len <= req.locked_len:
            return
        assert req.req_pool_idx is not None and req.last_node is not None
        row, kv_len = req.req_pool_idx, req.kv_len
        key = req.fill_ids[:kv_len]
        slots = self.req_to_token[row, :kv_len].clone()
        cached = self.tree.insert(key, slots, req.mm_hash)
        if cached > req.locked_len:  # someone cached these tokens first: drop our copies
            self.allocator.free(slots[req.locked_len : cached])
        tree_slots, node = self.tree.match_prefix(key, req.mm_hash)
        assert len(tree_slots) == kv_len
        self.req_to_token[row, :kv_len] = tree_slots
        self.tree.inc_lock_ref(node)
        self.tree.dec_lock_ref(req.last_node)
        req.last_node, req.locked_len = node, kv_len
        if req.cache_keys:
            self._tag(req, key)

    def _tag(self, req: Req, key: list[int]) -> None:
        """Tag the routing keys whose tokens ``key`` (now in the tree) covers."""
        assert self.tree is not None
        done, n = req.cache_keys_done, len(key)
        todo = req.cache_keys
        stop = done
        while stop < len(todo) and todo[stop][1] <= n:
            stop += 1
        if stop == done or self.cache_keys.full:
            return
        self.cache_keys.tagged(self.tree.tag(key, todo[done:stop], req.mm_hash))
        req.cache_keys_done = stop

    def release(self, req: Req) -> None:
        """Take every slot back from ``req`` (finish, abort, retraction).

        With the radix cache its KV is inserted into the tree (unlocked, so evictable): a
        retracted request re-admitted later may find it still there.
        """
        row = req.req_pool_idx
        if row is None:
            return
        slots = self.req_to_token[row, : req.kv_len].clone()
        if self.tree is not None:
            assert req.last_node is not None
            key = req.fill_ids[: req.kv_len]
            cached = self.tree.insert(key, slots, req.mm_hash)
            if cached > req.locked_len:
                self.allocator.free(slots[req.locked_len : cached])
            if req.cache_keys:
                self._tag(req, key)
                req.cache_keys_done = 0  # re-admitted after a retraction: tag again (deduplicated)
            self.tree.dec_lock_ref(req.last_node)
        else:
            self.allocator.free(slots)
        self.rows.free(row)
        req.reset_kv()

    def reset(self) -> None:
        """Forget every slot (no request may hold any): suspend, weight updates."""
        if self.tree is not None:
            assert self.tree.protected_size == 0, "reset while requests hold cached prefixes"
            self.tree.reset()
            self.cache_keys.reset()
        self.allocator.clear()
        self.rows.clear()

    # ------------------------------------------------------------------ checks

    def check_invariants(self, reqs: list[Req]) -> None:
        """Every slot is free, in the tree, or owned by exactly one request (tests)."""
        owned = [
            self.req_to_token[r.req_pool_idx, r.locked_len : r.kv_len]
            for r in reqs
            if r.req_pool_idx is not None
        ]
        tree = self.tree.all_slots() if self.tree else torch.empty(0, dtype=torch.int64)
        everything = torch.cat([*[o.cpu() for o in owned], tree.cpu(), self.allocator.free_slots().cpu()])
        assert len(everything) == self.num_slots, f"{len(everything)} slots accounted, {self.num_slots} exist"
        assert len(torch.unique(everything)) == self.num_slots, "a slot is owned twice"
