"""TEST AND BENCHMARK FIXTURE: the no-hub baseline of ``dpinfer bench coordinator``.

``serve_direct`` binds a ROUTER itself and answers ``Requests`` from DEALER clients with
``EngineOutputs`` (the null engine's echo), so a load generator can talk to a rank with no
coordinator in between.
"""

from __future__ import annotations

import multiprocessing.connection
from collections.abc import Callable
from typing import Any, cast

import zmq

from dpinfer import protocol
from dpinfer.errors import ProtocolError
from dpinfer.log import get_logger, set_role
from dpinfer.procutil import spawn_reporting_address
from dpinfer.protocol.codec import KIND_ENGINE_OUTPUTS, pack_batch
from dpinfer.testing.echo import EchoRequest

logger = get_logger(__name__)


def serve_direct(
    bind: str = "tcp://127.0.0.1:0", *, stream_chunks: int = 2, on_ready: Callable[[str], None] | None = None
) -> None:
    """No hub: bind a ROUTER and answer each ``Requests`` with ``EngineOutputs`` (one per turn)."""
    set_role("null-direct")
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.set_hwm(100_000)
    sock.bind(bind)
    if on_ready is not None:
        on_ready(cast(bytes, sock.last_endpoint).decode())
    pending: dict[bytes, tuple[list[Any], list[Any]]] = {}
    try:
        while True:
            sock.poll(-1, zmq.POLLIN)
            for _ in range(512):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = protocol.decode(frames[1:])
                except ProtocolError:
                    msg = None
                if not isinstance(msg, protocol.Requests):
                    continue  # a baseline for well-behaved benchmark clients only
                entries, bodies = pending.setdefault(frames[0], ([], []))
                for (request_id, stream), body in zip(msg.entries, msg.bodies, strict=True):
                    out_entries, out_bodies = EchoRequest(request_id, stream, body).outputs(stream_chunks)
                    entries.extend(out_entries)
                    bodies.extend(out_bodies)
            for identity, (entries, bodies) in pending.items():
                try:
                    sock.send_multipart(
                        [identity, pack_batch(KIND_ENGINE_OUTPUTS, entries), *bodies], zmq.NOBLOCK
                    )
                except zmq.Again:
                    logger.warning(
                        "direct client %r is not reading; dropped %d outputs", identity, len(entries)
                    )
            pending.clear()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=0)
        context.term()


def _direct_main(bind: str, stream_chunks: int, conn: multiprocessing.connection.Connection) -> None:
    serve_direct(bind, stream_chunks=stream_chunks, on_ready=conn.send)


def start_direct_null_engine(
    bind: str = "tcp://127.0.0.1:0", *, stream_chunks: int = 2, timeout_s: float = 30.0
) -> tuple[Any, str]:
    """Spawn a direct-mode null engine; ``(process, address)``. Stop it with ``process.kill()``."""
    return spawn_reporting_address(_direct_main, (bind, stream_chunks), "the direct null engine", timeout_s)
