"""The rank main's half of cache-aware routing: relay prefix cache events to the coordinator.

The scheduler's events (routing keys its radix cache started or stopped holding) arrive with
its outputs; ``CacheReporter`` keeps a mirror of what is held and sends the changes as one
``CacheReport`` per loop turn that had any (at most ``MAX_REPORT_KEYS`` keys a message), so
the hub's index trails the cache by one turn of this loop, not by a heartbeat. Only while the
coordinator asked for reports (``RegisterAck.cache_reports``); the tokenizer computes keys
only then (``SetCacheKeys``). After every registration the whole mirror is sent again with
``reset``: the hub starts each registration empty and learns exactly what is held.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from dpinfer import protocol
from dpinfer.protocol import local as m
from dpinfer.protocol import prefix_keys
from dpinfer.protocol.cache_report import MAX_REPORT_KEYS

MAX_MIRRORED = 1 << 17


class CacheReporter:
    def __init__(self, send: Callable[[protocol.CacheReport], None], send_to_tokenizer: zmq.Socket) -> None:
        self._send = send
        self._send_to_tokenizer = send_to_tokenizer
        self.enabled = False
        self.held: dict[int, None] = {}
        self._inserted: dict[int, None] = {}
        self._evicted: dict[int, None] = {}
        self._reset = False

    def registered(self, enabled: bool) -> None:
        """A (re-)registration: tell the tokenizer, and resend everything held."""
        if enabled != self.enabled:
            self._send_to_tokenizer.send_pyobj(m.SetCacheKeys(enabled))
        self.enabled = enabled
        self._inserted = dict(self.held)
        self._evicted = {}
        self._reset = True

    def add(self, events: m.CacheEvents) -> None:
        inserted, evicted, reset = events
        if reset:
            self.held.clear()
            self._inserted.clear()
            self._evicted.clear()
            self._reset = True
        held, pending_in, pending_out = self.held, self._inserted, self._evicted
        for key in evicted:
            if key in held:
                del held[key]
                if key in pending_in:
                    del pending_in[key]  # never reported: nothing to take back
                else:
                    pending_out[key] = None
        for key in inserted:
            if key not in held and len(held) < MAX_MIRRORED:
                held[key] = None
                if key in pending_out:
                    del pending_out[key]  # reported, evicted and back within one turn
                else:
                    pending_in[key] = None

    def flush(self) -> None:
        if not (self._inserted or self._evicted or self._reset):
            return
        if not self.enabled:
            self._inserted, self._evicted, self._reset = {}, {}, False
            return
        inserted, evicted = list(self._inserted), list(self._evicted)
        reset = self._reset
        self._inserted, self._evicted, self._reset = {}, {}, False
        while True:
            ins, inserted = inserted[:MAX_REPORT_KEYS], inserted[MAX_REPORT_KEYS:]
            ev, evicted = evicted[: MAX_REPORT_KEYS - len(ins)], evicted[MAX_REPORT_KEYS - len(ins) :]
            self._send(protocol.CacheReport(prefix_keys.pack(ins), prefix_keys.pack(ev), reset))
            reset = False
            if not inserted and not evicted:
                return
