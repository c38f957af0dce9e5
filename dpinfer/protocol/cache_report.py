"""``CacheReport``: a rank's prefix cache changes, for the hub's ``cache_aware`` index."""

from __future__ import annotations

from dataclasses import dataclass

from dpinfer.protocol.kinds import Kind
from dpinfer.protocol.messages import Message


@dataclass(frozen=True, slots=True)
class CacheReport(Message):
    """What a rank's prefix cache started and stopped holding since its last report, as
    packed ``protocol.prefix_keys``; ``reset``: forget all it reported before (sent after
    a registration, then ``inserted`` is everything it holds). Sent only when asked
    (``RegisterAck.cache_reports``), at most ``MAX_REPORT_KEYS`` keys per message."""

    KIND = Kind.CACHE_REPORT
    inserted: bytes
    evicted: bytes
    reset: bool = False


MAX_REPORT_KEYS = 8192
