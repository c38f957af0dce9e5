"""Everything the coordinator sends: per-turn batches, direct messages, never blocking.

Requests for a rank and outputs for a client accumulate during one loop turn and leave as
one ``Requests`` / ``Outputs`` message per destination at ``flush()``. A direct message
(control, status, error...) first flushes its destination's batch, so per-destination order
is preserved (e.g. a STOP never overtakes the requests submitted before it).

Counted here, as they leave: requests sent to each rank (``routed``, per rank identity),
``Error`` replies by code and control replies by signal (``Counters``): every one of them
passes through this outbox, and the request path pays one addition per batch, not per request.

Sends use NOBLOCK on a ROUTER with ROUTER_MANDATORY: a full peer (EAGAIN) or a vanished one
(EHOSTUNREACH) costs one counted drop, never a stall. Identities found unreachable are
reported back so the coordinator can retire a dead rank at once.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import zmq

from dpinfer import protocol
from dpinfer.protocol import Signal
from dpinfer.protocol.codec import KIND_OUTPUTS, KIND_REQUESTS, Frame, pack_batch

_SIGNALS = frozenset(s.value for s in Signal)


@dataclass
class Counters:
    """Coordinator counters reported in STATUS."""

    malformed_frames: int = 0
    unknown_peers: int = 0
    wrong_direction: int = 0
    dropped_sends: int = 0
    redispatched: int = 0
    migrated: int = 0
    """Requests that moved to another rank mid-stream (continued from what they streamed)."""
    failed: int = 0
    aborted: int = 0
    submitted: int = 0
    overloaded: int = 0
    """Requests refused at once because a queue limit was reached."""
    forbidden: int = 0
    """Messages refused because the sender's key lacks the role (CURVE roles)."""
    completed: int = 0
    rank_deaths: int = 0
    disconnects: int = 0
    """TCP connections closed, including peers ZMQ dropped for a message over ``max_frame_bytes``."""
    slow_clients: int = 0
    """Clients disconnected because they stopped reading (their queue filled); their
    requests were aborted."""
    silent_clients: int = 0
    """Clients forgotten after ``--client-timeout-s`` without a message; their requests were aborted."""
    handshake_failures: int = 0
    """Connections refused during the ZMTP/CURVE handshake (e.g. a key that is not authorized)."""
    error_replies: dict[str, int] = field(default_factory=dict)
    """``Error`` messages sent, by code (``not_handshaken``, ``malformed``, ``duplicate_request``...)."""
    control_signals: dict[str, int] = field(default_factory=dict)
    """Control signals answered, by signal (``invalid`` for a name that is none)."""
    control_failures: dict[str, int] = field(default_factory=dict)
    """Of those, the ones refused or failed (``ok`` false), by signal."""


Batch = tuple[list[tuple[object, ...]], list[Frame]]
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)


class Outbox:
    """Batches per destination identity plus direct sends on the coordinator's ROUTER."""

    def __init__(self, socket: zmq.Socket, counters: Counters) -> None:
        self._socket = socket
        self._counters = counters
        self.to_ranks: dict[bytes, Batch] = {}
        """rank identity -> ([(request_id, stream), ...], [body, ...]) to send as one ``Requests``."""
        self.to_clients: dict[bytes, Batch] = {}
        """client identity -> ([(client_request_id, final, rank), ...], [body, ...]) as one ``Outputs``."""
        self.unreachable: list[bytes] = []
        """Identities a send found gone since the coordinator last looked."""
        self.stalled: list[bytes] = []
        """Identities whose queue was full (a peer that stopped reading) since the coordinator
        last looked; the coordinator disconnects such a client rather than drop its outputs."""
        self.routed: dict[bytes, int] = {}
        """rank identity -> requests sent to it (a restarted rank has a new identity, and a new count)."""

    def _send(self, frames: list[Frame]) -> bool:
        # Frame by frame: ~3x cheaper than send_multipart. A ROUTER refuses a message (EAGAIN,
        # EHOSTUNREACH) only at its first frame, so no half message is ever queued.
        send = self._socket.send
        try:
            for frame in frames[:-1]:
                send(frame, _MORE)
            send(frames[-1], _NOBLOCK)
        except zmq.Again:
            self._counters.dropped_sends += 1
            identity = frames[0]
            assert isinstance(identity, bytes), "every outbox message starts with an identity"
            self.stalled.append(identity)
            return False
        except zmq.ZMQError as e:
            self._counters.dropped_sends += 1
            if e.errno == errno.EHOSTUNREACH:
                identity = frames[0]
                assert isinstance(identity, bytes), "every outbox message starts with an identity"
                self.unreachable.append(identity)
            return False
        return True

    def _send_requests(self, identity: bytes, batch: Batch) -> None:
        entries, bodies = batch
        if self._send([identity, pack_batch(KIND_REQUESTS, entries), *bodies]):
            self.routed[identity] = self.routed.get(identity, 0) + len(entries)

    def flush(self) -> None:
        """Send every batch accumulated this turn."""
        if self.to_ranks:
            batches, self.to_ranks = self.to_ranks, {}
            for identity, batch in batches.items():
                self._send_requests(identity, batch)
        if self.to_clients:
            batches, self.to_clients = self.to_clients, {}
            for identity, (entries, bodies) in batches.items():
                self._send([identity, pack_batch(KIND_OUTPUTS, entries), *bodies])

    def _flush_one(self, identity: bytes) -> None:
        batch = self.to_ranks.pop(identity, None)
        if batch is not None:
            self._send_requests(identity, batch)
        batch = self.to_clients.pop(identity, None)
        if batch is not None:
            self._send([identity, pack_batch(KIND_OUTPUTS, batch[0]), *batch[1]])

    def send(self, identity: bytes, msg: protocol.Message) -> None:
        """Send ``msg`` now, after whatever is batched for ``identity``."""
        self._flush_one(identity)
        self._send([identity, *protocol.encode(msg)])
        if isinstance(msg, protocol.Error):
            _bump(self._counters.error_replies, msg.code)
        elif isinstance(msg, protocol.ControlReply):
            signal = msg.ack.signal if msg.ack.signal in _SIGNALS else "invalid"
            _bump(self._counters.control_signals, signal)
            if not msg.ack.ok:
                _bump(self._counters.control_failures, signal)

    def output(self, identity: bytes, client_request_id: int, final: bool, rank: int, body: Frame) -> None:
        """Queue one output (a coordinator-made one, e.g. an error) for a client."""
        batch = self.to_clients.get(identity)
        if batch is None:
            batch = self.to_clients[identity] = ([], [])
        batch[0].append((client_request_id, final, rank))
        batch[1].append(body)

    def discard_rank(self, identity: bytes) -> None:
        """Forget requests batched for a rank that just died (the caller re-routes them)."""
        self.to_ranks.pop(identity, None)


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
