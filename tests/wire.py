"""A tiny raw-protocol client for tests: one DEALER socket speaking ``dpinfer.protocol``.

It keeps every message it receives, sorted by what it answers (outputs by client request
id, control replies by control id, status replies by query id, errors, notices), and every
wait has a deadline. Also: ``ScriptedRank``, an engine rank a test drives step by step;
helpers to wait for ranks and to end spawned processes.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from dpinfer import protocol
from dpinfer.protocol import NO_RANK, EngineState, OutputBody, prefix_keys
from dpinfer.protocol.codec import KIND_ENGINE_OUTPUTS, pack_batch
from dpinfer.rank.connection import registration


@dataclass
class Result:
    """Everything one request got back."""

    client_request_id: int
    partials: list[OutputBody] = field(default_factory=list)
    final: OutputBody | None = None
    rank: int = NO_RANK
    num_finals: int = 0
    routing: protocol.RouteInfo | None = None
    partial_routes: list[protocol.RouteInfo | None] = field(default_factory=list)
    """The ``routing`` of each partial output's entry (the hub names a stream's first)."""

    @property
    def streamed_text(self) -> str:
        parts = [p.delta_text for p in self.partials]
        return "".join(parts) + (self.final.delta_text if self.final else "")


class WireClient:
    """A raw client: ``hello()`` then ``submit``/``wait_results``/``control``/``status``."""

    def __init__(
        self,
        address: str,
        *,
        name: str = "wire",
        hello: bool = True,
        curve_dir: str | None = None,
        curve_keys: tuple[bytes, bytes, bytes] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.address = address
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.setsockopt(zmq.ROUTING_ID, f"{name}-{secrets.token_hex(6)}".encode())
        if curve_dir is not None:
            from dpinfer.protocol.curve import apply_peer_curve

            apply_peer_curve(self.sock, curve_dir)
        elif curve_keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve_keys
        self.sock.connect(address)
        self.name = name
        self.results: dict[int, Result] = {}
        self.control_replies: dict[int, protocol.ControlReply] = {}
        self.status_replies: dict[int, dict[str, Any]] = {}
        self.errors: list[protocol.Error] = []
        self.notices: list[protocol.Notice] = []
        self.hello_acks: list[protocol.HelloAck] = []
        self.other: list[protocol.Message] = []
        self._ids = itertools.count(1)
        if hello:
            self.hello()

    # ------------------------------------------------------------------ raw I/O

    def send(self, msg: protocol.Message) -> None:
        self.send_frames(protocol.encode(msg))

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send, or raise ``zmq.Again`` after 5 s (a DEALER with no connected peer blocks)."""
        self.sock.send_multipart(list(frames))

    def try_send(self, msg: protocol.Message) -> bool:
        """Send if a peer takes it now (e.g. a peer whose CURVE handshake failed cannot)."""
        try:
            self.sock.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def pump(self, timeout_s: float) -> bool:
        """Receive and sort whatever arrives within ``timeout_s``; True if anything came."""
        got = False
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return False
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return got
            got = True
            self._sort(protocol.decode(frames))

    def pump_for(self, duration_s: float) -> None:
        """Receive and sort everything that arrives during the whole of ``duration_s``."""
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            self.pump(left)

    def _sort(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Outputs):
            for entry, body in zip(msg.entries, msg.bodies, strict=True):
                crid, final = entry.client_request_id, entry.final
                result = self.results.setdefault(crid, Result(crid))
                out = OutputBody.from_bytes(body)
                result.rank = entry.rank
                if final:
                    result.routing = entry.routing
                    result.final = out
                    result.num_finals += 1
                else:
                    result.partials.append(out)
                    result.partial_routes.append(entry.routing)
        elif isinstance(msg, protocol.ControlReply):
            self.control_replies[msg.control_id] = msg
        elif isinstance(msg, protocol.StatusReply):
            self.status_replies[msg.query_id] = msgpack.unpackb(msg.bodies[0], raw=False)
        elif isinstance(msg, protocol.Error):
            self.errors.append(msg)
        elif isinstance(msg, protocol.Notice):
            self.notices.append(msg)
        elif isinstance(msg, protocol.HelloAck):
            self.hello_acks.append(msg)
        else:
            self.other.append(msg)

    def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition"
    ) -> None:
        """Pump until ``predicate()``; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: timed out after {timeout_s:g} s waiting for {what}")
            self.pump(min(left, 0.2))

    # ------------------------------------------------------------------ protocol helpers

    def hello(self, timeout_s: float = 10.0) -> protocol.HelloAck:
        n = len(self.hello_acks)
        self.send(protocol.ClientHello(protocol.PROTOCOL_VERSION, self.name))
        self.wait_for(lambda: len(self.hello_acks) > n, timeout_s, "HelloAck")
        return self.hello_acks[-1]

    def submit(
        self,
        prompts: Iterable[str],
        *,
        stream: bool = False,
        rank: int = NO_RANK,
        sampling: dict[str, Any] | None = None,
        keys: bool = False,
        group: int = 0,
    ) -> list[int]:
        """Send one ``Submit`` batch; the client request ids, in prompt order. ``keys``: with
        each prompt's prefix keys, as the SDK sends them; ``group``: every entry's."""
        entries, bodies, ids = [], [], []
        for prompt in prompts:
            crid = next(self._ids)
            body: dict[str, Any] = {"prompt": prompt}
            if sampling:
                body["sampling"] = sampling
            packed = b""
            if keys:
                request = protocol.RequestBody.from_builtins(body)
                packed = prefix_keys.pack(prefix_keys.body_keys(request))
            entries.append(protocol.SubmitEntry(crid, rank, stream, packed, group))
            bodies.append(protocol.pack_body(body))
            ids.append(crid)
        self.send(protocol.Submit(tuple(entries), tuple(bodies)))
        return ids

    def wait_results(self, ids: Iterable[int], timeout_s: float = 10.0) -> list[Result]:
        ids = list(ids)
        self.wait_for(
            lambda: all(i in self.results and self.results[i].final is not None for i in ids),
            timeout_s,
            f"final outputs of {len(ids)} request(s)",
        )
        return [self.results[i] for i in ids]

    def abort(self, ids: Iterable[int]) -> None:
        self.send(protocol.Abort(tuple(ids)))

    def control(
        self, signal: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> protocol.ControlAcknowledgement:
        control_id = self.send_control(signal, args)
        return self.wait_control(control_id, timeout_s)

    def send_control(self, signal: str, args: dict[str, Any] | None = None) -> int:
        control_id = next(self._ids)
        self.send(protocol.Control(control_id, signal, args or {}))
        return control_id

    def wait_control(self, control_id: int, timeout_s: float = 10.0) -> protocol.ControlAcknowledgement:
        """The acknowledgement in the ``ControlReply`` to ``control_id`` (what SDK callers get)."""
        self.wait_for(lambda: control_id in self.control_replies, timeout_s, f"ControlReply {control_id}")
        return self.control_replies[control_id].ack

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        query_id = next(self._ids)
        self.send(protocol.StatusQuery(query_id))
        self.wait_for(lambda: query_id in self.status_replies, timeout_s, "StatusReply")
        return self.status_replies.pop(query_id)

    def wait_ranks(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0, what: str = "ranks"
    ) -> dict[str, Any]:
        """Query STATUS until ``predicate(status)`` holds; return that status."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout_s:g} s waiting for {what}; last status: {status}"
                )
            self.pump(0.05)

    def wait_live(self, rank_ids: Iterable[int], timeout_s: float = 15.0) -> dict[str, Any]:
        want = set(rank_ids)
        return self.wait_ranks(lambda s: want <= live_ranks(s), timeout_s, f"live ranks {sorted(want)}")

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.close(linger=0)


def live_ranks(status: dict[str, Any]) -> set[int]:
    return {r["rank"] for r in status["ranks"] if r["alive"]}


def rank_info(status: dict[str, Any], rank: int) -> dict[str, Any]:
    return next(r for r in status["ranks"] if r["rank"] == rank)


@dataclass
class Deployment:
    """A coordinator process, null-rank processes by rank id, and a handshaken ``WireClient``."""

    handle: Any
    client: WireClient
    ranks: dict[int, Any] = field(default_factory=dict)
    clients: list[WireClient] = field(default_factory=list)
    retired: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, ranks: Iterable[int], rank_kwargs: dict[int, dict[str, Any]], **config: Any) -> Deployment:
        from dpinfer.config import CoordinatorConfig
        from dpinfer.coordinator.process import start_coordinator

        handle = start_coordinator(CoordinatorConfig(**{"port": 0, **config}))
        dep = cls(handle, WireClient(handle.address, name="main"))
        ranks = list(ranks)
        try:
            for rank in ranks:
                dep.add_rank(rank, wait=False, **rank_kwargs.get(rank, {}))
            dep.client.wait_live(ranks)
        except BaseException:
            dep.close()
            raise
        return dep

    @property
    def address(self) -> str:
        return self.handle.address

    def add_rank(self, rank: int, wait: bool = True, **kwargs: Any) -> Any:
        """Start a null rank process (a previous process of that rank id is kept for cleanup)."""
        from dpinfer.testing.null_rank import start_null_engines

        if rank in self.ranks:
            self.retired.append(self.ranks[rank])
        self.ranks[rank] = start_null_engines(self.address, [rank], **kwargs)[0]
        if wait:
            self.client.wait_ranks(
                lambda s: any(
                    r["rank"] == rank and r["alive"] and r["pid"] == self.ranks[rank].pid for r in s["ranks"]
                ),
                what=f"rank {rank} (pid {self.ranks[rank].pid}) to register",
            )
        return self.ranks[rank]

    def new_client(self, name: str, **kwargs: Any) -> WireClient:
        client = WireClient(self.address, name=name, **kwargs)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in [self.client, *self.clients]:
            client.close()
        self.handle.stop(timeout_s=5)
        end_processes([*self.ranks.values(), *self.retired])


def end_processes(procs: Iterable[Any], timeout_s: float = 5.0) -> None:
    """Kill processes this test started (by handle) and reap them; already-dead ones are skipped."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout_s)


class ScriptedRank:
    """An engine rank driven step by step by the test."""

    def __init__(self, address: str, rank: int = 0, max_in_flight: int = 0) -> None:
        self.wire = WireClient(address, name=f"rank{rank}", hello=False)
        self.rank = rank
        self.max_in_flight = max_in_flight

    def register(self) -> protocol.RegisterAck:
        n = len(self._of(protocol.RegisterAck))
        self.wire.send(registration(self.rank, model="scripted", max_in_flight=self.max_in_flight))
        self.wire.wait_for(lambda: len(self._of(protocol.RegisterAck)) > n, what="RegisterAck")
        return self._of(protocol.RegisterAck)[-1]

    def heartbeat(self) -> None:
        self.wire.send(protocol.Heartbeat(protocol.LoadStats(), EngineState.RUNNING))

    def requests(self, count: int, after: int = 0) -> list[int]:
        """The ids of the first ``count`` requests dispatched after the first ``after``."""

        def ids() -> list[int]:
            return [e.request_id for msg in self._of(protocol.Requests) for e in msg.entries][after:]

        self.wire.wait_for(lambda: len(ids()) >= count, what=f"{count} requests")
        return ids()[:count]

    def finals(self, request_ids: list[int], bodies: list[bytes]) -> None:
        entries = [(rid, True, 1) for rid in request_ids]
        self.wire.send_frames([pack_batch(KIND_ENGINE_OUTPUTS, entries), *bodies])

    def _of(self, kind: type[Any]) -> list[Any]:
        return [m for m in self.wire.other if isinstance(m, kind)]

    def close(self) -> None:
        self.wire.close()


def final_body(text: str) -> bytes:
    """A rank's final output body for a request that ended with ``stop`` after one token."""
    return OutputBody(text=text, token_ids=(1,), finish_reason="stop", completion_tokens=1).to_bytes()
