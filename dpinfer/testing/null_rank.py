"""TEST AND BENCHMARK FIXTURE: an engine rank with no model.

``NullEngine`` speaks the real rank protocol through ``EngineConnection`` and completes each
request at once (or after ``delay_s``, to play a slow rank) with the text ``"echo: " +
prompt`` and ``token_ids`` = the UTF-8 bytes of that text, so streaming has real deltas
(``stream_chunks`` partial outputs, then the final). It honours PAUSE (requests queue,
nothing completes until UNPAUSE), SUSPEND/RESUME/UPDATE_WEIGHTS (acknowledged with the new
state), STOP (drain until the deadline or abort, ack, deregister, exit 0) and aborts, and
heartbeats its load on time whatever ``delay_s`` is. It never serves real traffic.

The no-hub baseline of the coordinator benchmark (``--direct``) lives in ``null_direct.py``.

    python -m dpinfer.testing.null_rank --coordinator ADDR --rank N [--delay-s X] [--curve-dir D]
    python -m dpinfer.testing.null_rank --direct tcp://127.0.0.1:0
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing as mp
import multiprocessing.connection
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

from dpinfer import protocol
from dpinfer.errors import ProtocolError
from dpinfer.log import get_logger, set_role
from dpinfer.protocol import EngineOutputEntry, EngineState, Signal
from dpinfer.rank.connection import EngineConnection, registration
from dpinfer.testing.echo import EchoRequest, SimulatedCache

logger = get_logger(__name__)

_packb = msgpack.Packer(use_bin_type=True).pack
_ABORTED = protocol.error_body("aborted", protocol.FinishReason.ABORT)
_STOPPED = protocol.error_body("the rank stopped before finishing", protocol.FinishReason.ABORT)


class NullEngine:
    """One null rank: ``run()`` registers, serves, and returns when told to STOP.

    With ``delay_s`` a request's outputs are spread evenly over ``delay_s`` seconds (partials
    first, so a killed slow rank leaves requests that streamed something and some that did not).
    """

    def __init__(
        self,
        address: str,
        rank: int,
        *,
        delay_s: float = 0.0,
        stream_chunks: int = 2,
        curve_dir: str | None = None,
        model: str = "null",
        context: zmq.Context | None = None,
        cache_keys: int = 4096,
    ) -> None:
        self.rank = rank
        self.delay_s = delay_s
        self.stream_chunks = stream_chunks
        self.state = EngineState.RUNNING
        info = registration(rank, "cpu", model, 1 << 20, 0)
        self.conn = EngineConnection(address, info, curve_dir=curve_dir, context=context)
        self._reqs: dict[int, EchoRequest] = {}
        self.cache = SimulatedCache(cache_keys)
        """Routing keys of what it served, reported when the hub routes ``cache_aware``."""
        self._queued: list[int] = []  # arrived while paused, not started
        self._due: list[tuple[float, int]] = []  # (when, request_id) of each started request's next output
        self._out_entries: list[EngineOutputEntry] = []
        self._out_bodies: list[bytes] = []
        self._stop: tuple[int, float] | None = None  # (control_id, drain deadline) once STOP arrived
        self.exit_code: int | None = None

    @property
    def _serving(self) -> bool:
        return self.state is EngineState.RUNNING or self._stop is not None

    def run(self, connect_timeout_s: float = 30.0) -> int:
        """Serve until STOP (returns 0) or until the coordinator refuses this rank (returns 1)."""
        ack = self.conn.connect_and_register(connect_timeout_s)
        self.state = EngineState(ack.state)
        try:
            while self.exit_code is None:
                wait_s = self.conn.seconds_until_heartbeat()
                if self._due and self._serving:
                    wait_s = min(wait_s, max(0.0, self._due[0][0] - time.monotonic()))
                if self.conn.socket.poll(int(wait_s * 1000) + 1 if wait_s > 0 else 0, zmq.POLLIN):
                    for msg in self.conn.recv_ready():
                        self._handle(msg)
                self._advance(time.monotonic())
                self._flush()
                if self._stop is not None:
                    self._maybe_finish_stop()
                if self.exit_code is None and self.conn.seconds_until_heartbeat() == 0:
                    waiting = len(self._queued)
                    load = protocol.LoadStats(waiting, len(self._reqs) - waiting)
                    self.conn.send_heartbeat(load, self.state)
        finally:
            self.conn.close()
        return self.exit_code or 0

    def _handle(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Requests):
            for (request_id, stream), body in zip(msg.entries, msg.bodies, strict=True):
                req = EchoRequest(request_id, stream, body, self.conn.cache_reports)
                if req.keys:
                    self.cache.serve(req.keys)
                self._reqs[request_id] = req
                if self._serving or req.error:
                    self._start(req)
                else:
                    self._queued.append(request_id)
        elif isinstance(msg, protocol.EngineAbort):
            for request_id in msg.request_ids:
                if self._reqs.pop(request_id, None) is not None:
                    if request_id in self._queued:
                        self._queued.remove(request_id)
                    self._emit([EngineOutputEntry(request_id, True, 0)], [_ABORTED])
        elif isinstance(msg, protocol.EngineControl):
            self._control(msg)
        elif isinstance(msg, protocol.RegisterAck):
            # Registered again after being declared dead: the coordinator has re-dispatched or
            # failed everything this rank held, so drop it.
            self._reqs.clear()
            self._queued.clear()
            self._due.clear()
            self.state = EngineState(msg.state)
            if msg.cache_reports:  # a new registration starts empty at the hub: say what is held
                self.cache.inserted = list(self.cache.keys)
                self._report(reset=True)
        elif isinstance(msg, protocol.Error):
            logger.warning("coordinator error %s: %s", msg.code, msg.message)
            if msg.code == "rank_taken":
                self.exit_code = 1

    def _start(self, req: EchoRequest) -> None:
        entries, bodies = req.outputs(self.stream_chunks)
        if self.delay_s <= 0 or req.error:
            del self._reqs[req.request_id]
            self._emit(entries, bodies)
            return
        req.plan = (entries, bodies)
        req.step_s = self.delay_s / len(entries)
        heapq.heappush(self._due, (time.monotonic() + req.step_s, req.request_id))

    def _advance(self, now: float) -> None:
        """Emit every scheduled output that is due (nothing while paused)."""
        due = self._due
        while due and due[0][0] <= now and self._serving:
            when, request_id = heapq.heappop(due)
            req = self._reqs.get(request_id)
            if req is None:
                continue  # aborted meanwhile
            entries, bodies = req.plan
            i = req.next_output
            self._emit(entries[i : i + 1], bodies[i : i + 1])
            req.next_output = i + 1
            if req.next_output == len(entries):
                del self._reqs[request_id]
            else:
                heapq.heappush(due, (when + req.step_s, request_id))

    def _emit(self, entries: Sequence[EngineOutputEntry], bodies: Sequence[bytes]) -> None:
        self._out_entries.extend(entries)
        self._out_bodies.extend(bodies)

    def _flush(self) -> None:
        if self._out_entries:
            self.conn.send_outputs(self._out_entries, self._out_bodies)
            self._out_entries, self._out_bodies = [], []
        if self.cache.inserted or self.cache.evicted:
            self._report(reset=False)

    def _report(self, reset: bool) -> None:
        inserted, evicted = self.cache.take() or (b"", b"")
        self.conn.send_cache_report(protocol.CacheReport(inserted, evicted, reset))

    def _control(self, msg: protocol.EngineControl) -> None:
        signal = msg.signal
        try:
            target = protocol.next_state(self.state, signal)
        except ProtocolError as e:
            self._ack(msg.control_id, signal, False, str(e))
            return
        if signal is Signal.STOP or signal is Signal.SHUTDOWN:
            drain = bool(msg.args.get("drain", True))
            deadline = time.monotonic() + float(msg.args.get("deadline_s", 30.0)) if drain else 0.0
            self._stop = (msg.control_id, deadline)
        else:
            self.state = target
        if self._serving:
            queued, self._queued = self._queued, []
            for request_id in queued:
                self._start(self._reqs[request_id])
        if self._stop is None:
            self._flush()
            self._ack(msg.control_id, signal, True)

    def _ack(self, control_id: int, signal: Signal, ok: bool, error: str = "") -> None:
        ack = protocol.RankAck(self.rank, ok, self.state, error)
        self.conn.send_control_ack(protocol.ControlAck(control_id, signal, ack))

    def _maybe_finish_stop(self) -> None:
        assert self._stop is not None
        control_id, deadline = self._stop
        if self._reqs and time.monotonic() < deadline:
            return
        for request_id in self._reqs:
            self._emit([EngineOutputEntry(request_id, True, 0)], [_STOPPED])
        self._reqs.clear()
        self._due.clear()
        self._flush()
        self.state = EngineState.STOPPED
        self._ack(control_id, Signal.STOP, True)
        self.conn.deregister("stopped")
        self.exit_code = 0


def run_null_engine(
    address: str,
    rank: int,
    *,
    delay_s: float = 0.0,
    stream_chunks: int = 2,
    curve_dir: str | None = None,
    connect_timeout_s: float = 30.0,
    cache_keys: int = 4096,
) -> None:
    """Entry point of one null rank process; exits non-zero if it was refused or unreachable."""
    set_role("null-rank", rank)
    engine = NullEngine(
        address,
        rank,
        delay_s=delay_s,
        stream_chunks=stream_chunks,
        curve_dir=curve_dir,
        cache_keys=cache_keys,
    )
    code = engine.run(connect_timeout_s)
    if code:
        raise SystemExit(code)


def start_null_engines(address: str, ranks: Sequence[int], **kwargs: Any) -> list[Any]:
    """Spawn one null rank process per rank id (spawn start method); the caller stops them.

    ``kwargs`` go to ``run_null_engine`` (``delay_s``, ``stream_chunks``, ``curve_dir``...).
    The processes are daemonic, so they also die with the caller.
    """
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=run_null_engine, args=(address, r), kwargs=kwargs, daemon=True) for r in ranks
    ]
    for proc in procs:
        proc.start()
    return procs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpinfer.testing.null_rank",
        description="Null rank: test/benchmark fixture, no model.",
    )
    add = parser.add_argument
    add("--coordinator", help="coordinator address, e.g. tcp://127.0.0.1:5555")
    add("--rank", type=int, default=0, help="rank id")
    add("--delay-s", type=float, default=0.0, help="seconds each request takes (a slow rank)")
    add("--stream-chunks", type=int, default=2, help="partial outputs before the final one")
    add("--curve-dir", default=None, help="this rank's CURVE key pair and the server's public key")
    add("--direct", metavar="BIND", default=None, help="no coordinator: bind here and answer Requests")
    args = parser.parse_args(argv)
    if args.direct:
        from dpinfer.testing.null_direct import serve_direct

        serve_direct(args.direct, stream_chunks=args.stream_chunks, on_ready=lambda a: print(a, flush=True))
    elif not args.coordinator:
        parser.error("--coordinator is required (or --direct BIND)")
    else:
        run_null_engine(
            args.coordinator,
            args.rank,
            delay_s=args.delay_s,
            stream_chunks=args.stream_chunks,
            curve_dir=args.curve_dir,
        )


if __name__ == "__main__":
    main()
