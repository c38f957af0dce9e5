"""The in-flight table's record, and the queue of requests waiting for any live rank."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpinfer.coordinator.registry import ClientPeer, RankPeer


class Req:
    """One request between ``Submit`` and its final output.

    ``body`` keeps the request body frame while the request may still be re-dispatched to
    another rank; it is dropped (``None``) once the client has seen output, which is also
    how the coordinator knows a rank's death must fail the request instead.
    """

    __slots__ = ("body", "client", "client_request_id", "deadline", "pinned", "rank", "request_id", "stream")

    def __init__(
        self,
        request_id: int,
        client: ClientPeer,
        client_request_id: int,
        body: Any,
        stream: bool,
        pinned: int,
    ) -> None:
        self.request_id = request_id
        self.client = client
        self.client_request_id = client_request_id
        self.body = body
        self.stream = stream
        self.pinned = pinned
        self.rank: RankPeer | None = None
        self.deadline = 0.0


class PendingQueue:
    """Requests with no live rank to go to, oldest first; each fails at its ``deadline``.

    Every entry waits the same ``no_rank_timeout_s``, so arrival order is deadline order.
    Entries whose request finished meanwhile (aborted, failed) are skipped lazily.
    """

    def __init__(self) -> None:
        self._queue: deque[Req] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, req: Req, deadline: float) -> None:
        req.rank = None
        req.deadline = deadline
        self._queue.append(req)

    def take_all(self) -> list[Req]:
        reqs = list(self._queue)
        self._queue.clear()
        return reqs

    def expired(self, now: float) -> list[Req]:
        out: list[Req] = []
        while self._queue and self._queue[0].deadline <= now:
            out.append(self._queue.popleft())
        return out

    def next_deadline(self) -> float | None:
        return self._queue[0].deadline if self._queue else None
