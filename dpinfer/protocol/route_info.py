"""``RouteInfo``: the hub's explanation of one routing decision (in ``OutputEntry``)."""

from __future__ import annotations

from typing import NamedTuple


class RouteInfo(NamedTuple):
    """Why the hub sent a request where it did (``cache_aware`` routing; on the final output
    and on a stream's first output)."""

    policy: str
    matched_chars: int
    """Length of the prompt prefix the chosen rank holds, as of its last cache report (or,
    with ``pending``, that the hub sent it and it has not reported yet): in characters of
    canonical content (``prefix_keys``; a token-id prompt's key blocks count as many
    characters as a text block, 4 per token id)."""
    reason: str
    """``match`` (the best-matching rank), ``pending`` (the best match is a prefix the rank
    was sent and has not reported yet), ``spread`` (the best match was loaded past the
    anti-hotspot threshold), ``load`` (no rank holds a prefix), ``pinned``, ``credit``
    (the choice was full; the least-loaded rank with credit took it), or ``group`` (a
    completion of ``SamplingParams.n`` sent where the group's first went)."""
