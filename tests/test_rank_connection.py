"""EngineConnection against a scripted coordinator (a raw ROUTER on loopback): registration that
survives a lost reply (issue 9, case 4)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from dpinfer import protocol
from dpinfer.rank import connection
from dpinfer.rank.connection import EngineConnection, registration

DEADLINE_MS = 10_000


class FakeHub:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.identity = b""

    def recv(self) -> protocol.Message:
        assert self.sock.poll(DEADLINE_MS), "the rank sent nothing"
        identity, *frames = self.sock.recv_multipart()
        self.identity = identity
        return protocol.decode(frames)

    def send(self, msg: protocol.Message) -> None:
        self.sock.send_multipart([self.identity, *protocol.encode(msg)])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    h = FakeHub()
    yield h
    h.close()


def _ready(conn: EngineConnection) -> list[protocol.Message]:
    assert conn.socket.poll(DEADLINE_MS), "the hub's message did not arrive"
    return conn.recv_ready()


def test_a_lost_register_reply_is_retried(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = EngineConnection(hub.address, registration(3, "cpu", "m", 100, 100))
    try:
        import threading

        registered: list[protocol.RegisterAck] = []
        t = threading.Thread(target=lambda: registered.append(conn.connect_and_register(10.0)))
        t.start()
        assert isinstance(hub.recv(), protocol.Register)
        hub.send(protocol.RegisterAck(3, protocol.EngineState.RUNNING, 0.5))
        t.join(10)
        assert registered, "registered"
        # The hub forgets the rank (declared dead, or restarted): the rank registers again...
        hub.send(protocol.Error("not_registered", "unknown rank"))
        assert _ready(conn) == []
        assert isinstance(hub.recv(), protocol.Register)
        # ...and that Register's answer is lost. More errors inside the retry interval send nothing,
        monkeypatch.setattr(connection, "_RETRY_REGISTER_S", 3600.0)
        hub.send(protocol.Error("not_registered", "unknown rank"))
        assert _ready(conn) == []
        assert not hub.sock.poll(200), "one Register per retry interval"
        # ...but once it has passed, the next error sends another Register, which is answered.
        monkeypatch.setattr(connection, "_RETRY_REGISTER_S", 0.0)
        hub.send(protocol.Error("not_registered", "unknown rank"))
        assert _ready(conn) == []
        assert isinstance(hub.recv(), protocol.Register)
        hub.send(protocol.RegisterAck(3, protocol.EngineState.PAUSED, 0.5))
        (ack,) = _ready(conn)
        assert isinstance(ack, protocol.RegisterAck) and ack.state is protocol.EngineState.PAUSED
    finally:
        conn.close()
