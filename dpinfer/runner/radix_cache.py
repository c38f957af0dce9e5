"""A radix tree over cached token prefixes, mapping each cached token to its KV slot.

Token-level (page size 1), as in SGLang's ``RadixCache``. The tree owns the slots stored in
it: ``evict`` hands least-recently-used, unlocked leaf slots back through ``free_slots``.
A request that uses a cached prefix locks the path to its last matched node
(``inc_lock_ref``); locked nodes are never evicted until ``dec_lock_ref``.

Namespaces: every key lives under a namespace (``None`` for plain text, otherwise e.g. the
content hash of a prompt's images). Each namespace has its own root, so requests whose
namespaces differ never share KV at all, not even a common text prefix before an image.
That is deliberately conservative: an image changes the KV of every token after it, and a
shared text prefix before the image is rare enough not to be worth a special case.

Tags (cache-aware routing): ``tag`` attaches a routing key to the node that holds a given
token position of a cached path (``tags`` maps key -> offset inside the node; a split hands
each tag to the half holding its position). Eviction removes whole leaves, so a key stays
held exactly while its node does; the keys of every evicted node go to ``on_untag``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch

Namespace = bytes | None


class TreeNode:
    """One edge of the tree: a run of tokens (``key``) and their KV slots (``value``)."""

    __slots__ = ("children", "key", "last_access", "lock_ref", "namespace", "parent", "tags", "value")

    def __init__(self, namespace: Namespace, parent: TreeNode | None = None) -> None:
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = []
        self.value = torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = 0
        self.namespace = namespace
        self.tags: dict[int, int] | None = None
        """Routing keys held by this node -> the 1-based offset of their last token in it."""

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_access < other.last_access


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """Prefix cache over KV slots. ``free_slots`` receives the slots of evicted nodes."""

    def __init__(
        self,
        free_slots: Callable[[torch.Tensor], None],
        on_untag: Callable[[Iterable[int]], None] | None = None,
    ) -> None:
        self._free_slots = free_slots
        self._on_untag = on_untag
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget everything without freeing slots (the caller resets the allocator)."""
        self._roots: dict[Namespace, TreeNode] = {}
        self.evictable_size = 0
        """Cached tokens on unlocked nodes: what ``evict`` can give back."""
        self.protected_size = 0
        """Cached tokens on locked nodes (used by running requests)."""

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def _root(self, namespace: Namespace, create: bool) -> TreeNode | None:
        root = self._roots.get(namespace)
        if root is None and create:
            root = TreeNode(namespace)
            root.lock_ref = 1  # roots are never evicted
            self._roots[namespace] = root
        return root

    # ------------------------------------------------------------------ lookup

    def match_prefix(self, key: Sequence[int], namespace: Namespace = None) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of ``key``: its slots and the node where it ends.

        A match ending inside a node splits that node, so the returned node covers exactly
        the matched prefix (lock it to keep the prefix alive).
        """
        root = self._root(namespace, create=False)
        if root is None:  # an unseen namespace: match nothing, create nothing
            return torch.empty(0, dtype=torch.int64), TreeNode(namespace)
        node, values, pos = root, [], 0
        now = next(self._clock)
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = common_prefix_len(child.key, key[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut ``node`` after ``n`` tokens; return the new upper half (same lock count)."""
        parent = node.parent
        assert parent is not None and 0 < n < len(node.key)
        upper = TreeNode(node.namespace, parent)
        upper.key, upper.value = node.key[:n], node.value[:n]
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        upper.children = {node.key[n]: node}
        node.key, node.value, node.parent = node.key[n:], node.value[n:], upper
        if node.tags:
            tags = node.tags
            upper.tags = {k: o for k, o in tags.items() if o <= n} or None
            node.tags = {k: o - n for k, o in tags.items() if o > n} or None
        parent.children[upper.key[0]] = upper
        return upper

    # ------------------------------------------------------------------ insert

    def insert(self, key: Sequence[int], slots: torch.Tensor, namespace: Namespace = None) -> int:
        """Cache ``key`` -> ``slots``; return how many leading tokens were already cached.

        The caller still owns ``slots[:returned]`` (duplicates of cached KV: free them);
        the tree takes ownership of ``slots[returned:]``.
        """
        assert len(key) == len(slots), "one KV slot per token"
        root = self._root(namespace, create=True)
        assert root is not None
        node, pos, now = root, 0, next(self._clock)
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                leaf = TreeNode(namespace, node)
                leaf.key, leaf.value = list(key[pos:]), slots[pos:].clone()
                leaf.last_access = now
                node.children[leaf.key[0]] = leaf
                self.evictable_size += len(leaf.key)
                return pos
            n = common_prefix_len(child.key, key[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        return pos

    # ------------------------------------------------------------------ locks

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while not node.is_root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one ``inc_lock_ref(node)``."""
        while not node.is_root:
            assert node.lock_ref > 0, "unbalanced dec_lock_ref"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            assert node.parent is not None
            node = node.parent

    # ------------------------------------------------------------------ eviction

    def _leaves(self) -> list[TreeNode]:
        leaves, stack = [], list(self._roots.values())
        while stack:
            node = stack.pop()
            if not node.children and not node.is_root:
                leaves.append(node)
            stack.extend(node.children.values())
        return leaves

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from unlocked leaves, least recently used first.

        Returns the number freed (less when not enough is evictable).
        """
        if num_tokens <= 0:
            return 0
        heap = [leaf for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            self._free_slots(leaf.value)
            if leaf.tags and self._on_untag is not None:
                self._on_untag(leaf.tags)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            del parent.children[leaf.key[0]]
            if parent.children:
                continue
            if not parent.is_root and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
            elif parent.is_root and parent.namespace is not None:
                del self._roots[parent.namespace]  # one root per image hash must not pile up
        return freed

    # ------------------------------------------------------------------ routing tags

    def tag(
        self, key: Sequence[int], tags: Sequence[tuple[int, int]], namespace: Namespace = None
    ) -> list[int]:
        """Attach each ``(routing_key, num_tokens)`` to the node holding token ``num_tokens - 1``
        of the cached path ``key`` (just inserted, so present whole); return the routing keys
        that were not already on their node. ``tags`` are in increasing ``num_tokens`` order."""
        root = self._root(namespace, create=False)
        added: list[int] = []
        if root is None:
            return added
        node, start, i = root, 0, 0
        while i < len(tags) and start < len(key):
            child = node.children.get(key[start])
            if child is None:
                break
            end = start + len(child.key)
            while i < len(tags) and tags[i][1] <= end:
                routing_key, num_tokens = tags[i]
                i += 1
                if num_tokens <= start:
                    continue
                if child.tags is None:
                    child.tags = {}
                if routing_key not in child.tags:
                    child.tags[routing_key] = num_tokens - start
                    added.append(routing_key)
            node, start = child, end
        return added

    def all_slots(self) -> torch.Tensor:
        """Every slot the tree owns, on the CPU (for invariant checks in tests)."""
        values, stack = [], list(self._roots.values())
        while stack:
            node = stack.pop()
            if len(node.value):
                values.append(node.value.cpu())
            stack.extend(node.children.values())
        return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
