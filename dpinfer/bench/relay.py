"""The floor under any ZMQ hub: a bare pyzmq relay with no protocol work at all.

It forwards whole messages between one client and one direct null rank (ROUTER in front,
DEALER behind) and does nothing else: no decoding, no routing, no bookkeeping. Whatever it
adds to a round trip is the cost of the two extra ZMQ hops and process wake-ups on this
machine; ``bench coordinator`` reports it beside the coordinator so the coordinator's own
share of the added latency can be read off.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

import zmq

from dpinfer.procutil import spawn_reporting_address


def _relay_main(target: str, conn: Connection) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    front.bind("tcp://127.0.0.1:0")
    back.connect(target)
    conn.send(cast(bytes, front.last_endpoint).decode())
    conn.close()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    client = b""
    while True:
        for sock, _ in poller.poll():
            if sock is front:
                client, *frames = front.recv_multipart(copy=False)
                back.send_multipart(frames, copy=False)
            else:
                front.send_multipart([client, *back.recv_multipart(copy=False)], copy=False)


def start_bare_relay(target: str, timeout_s: float = 30.0) -> tuple[BaseProcess, str]:
    """Spawn a relay in front of the direct rank at ``target``; ``(process, address)``."""
    return spawn_reporting_address(_relay_main, (target,), "the bare relay", timeout_s)
