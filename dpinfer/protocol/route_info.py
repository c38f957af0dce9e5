"""``RouteInfo``: the hub's explanation of one routing decision (in ``OutputEntry``)."""

from __future__ import annotations

from typing import NamedTuple


class RouteInfo(NamedTuple):
    """Why the hub sent a request where it did (``cache_aware`` routing; on the final output)."""

    policy: str
    matched_chars: int
    """Length of the prompt prefix the chosen rank holds, as of its last cache report: in
    characters of canonical content (``prefix_keys``; a token-id prompt's key blocks count
    as many characters as a text block, 4 per token id)."""
    reason: str
    """``match`` (the best-matching rank), ``spread`` (the best match was loaded past the
    anti-hotspot threshold), ``load`` (no rank holds a prefix), ``pinned``, or ``credit``
    (the choice was full; the least-loaded rank with credit took it)."""
