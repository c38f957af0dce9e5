"""Coordinator pieces without sockets: routing, lifecycle, the fast codec, keys, echo outputs."""

from __future__ import annotations

import random

import msgpack
import pytest

from dpinfer import protocol
from dpinfer.config import ConfigError
from dpinfer.coordinator.lifecycle import Lifecycle
from dpinfer.coordinator.registry import RankPeer
from dpinfer.coordinator.routing import POLICIES, make_policy
from dpinfer.errors import ProtocolError
from dpinfer.protocol import TRANSITIONS, EngineState, Signal, codec
from dpinfer.testing.echo import EchoRequest


def _peer(rank: int, in_flight: int = 0) -> RankPeer:
    msg = protocol.Register(protocol.PROTOCOL_VERSION, rank, 100 + rank, "h", "cpu", "m", 10, 10)
    peer = RankPeer(f"r{rank}".encode(), msg, 0.0, "running")
    peer.in_flight = in_flight
    return peer


# ---------------------------------------------------------------------------- routing


def test_round_robin_cycles_in_order() -> None:
    ranks = [_peer(r) for r in range(3)]
    policy = make_policy("round_robin")
    assert [policy.pick(ranks).rank for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_prefers_lowest_in_flight() -> None:
    ranks = [_peer(0, 5), _peer(1, 2), _peer(2, 9)]
    policy = make_policy("least_loaded")
    assert {policy.pick(ranks).rank for _ in range(5)} == {1}


def test_least_loaded_rotates_ties_so_idle_load_spreads() -> None:
    ranks = [_peer(r) for r in range(4)]
    policy = make_policy("least_loaded")
    picks = [policy.pick(ranks).rank for _ in range(8)]
    assert picks == [0, 1, 2, 3, 0, 1, 2, 3], "ties must rotate, not pile onto rank 0"


def test_least_loaded_uses_coordinator_counts_not_heartbeats() -> None:
    busy, idle = _peer(0, in_flight=10), _peer(1, in_flight=0)
    busy.on_heartbeat(
        protocol.Heartbeat(protocol.LoadStats(), protocol.EngineState.RUNNING), 1.0
    )  # a late "I'm idle" report
    idle.on_heartbeat(protocol.Heartbeat(protocol.LoadStats(50, 50), protocol.EngineState.RUNNING), 1.0)
    assert busy.in_flight == 10
    assert make_policy("least_loaded").pick([busy, idle]) is idle


def test_unknown_policy_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        make_policy("random_walk")
    for name in POLICIES:
        assert name in str(err.value)


# ---------------------------------------------------------------------------- lifecycle


def _control(signal: str, args: dict | None = None, control_id: int = 7) -> protocol.Control:
    return protocol.Control(control_id, signal, args or {})


def _args(signal: Signal) -> dict:
    return {"path": "/weights"} if signal is Signal.UPDATE_WEIGHTS else {}


def running(*ranks: int) -> dict[int, EngineState]:
    """``Lifecycle.begin``'s view of live ranks: each rank's state when the signal is sent."""
    return dict.fromkeys(ranks, EngineState.RUNNING)


@pytest.mark.parametrize("state", list(EngineState))
@pytest.mark.parametrize("signal", list(Signal))
def test_every_transition_follows_the_table(state: EngineState, signal: Signal) -> None:
    lifecycle = Lifecycle(control_timeout_s=1.0)
    lifecycle.state = state
    result = lifecycle.begin(b"client", _control(signal.value, _args(signal)), running(0, 1), now=0.0)
    valid_in, target = TRANSITIONS[signal]
    if state in valid_in:
        assert not isinstance(result, protocol.ControlReply)
        assert lifecycle.state is target and result.waiting == {0, 1}
    else:
        assert isinstance(result, protocol.ControlReply) and not result.ack.ok
        assert state.value in result.ack.error and result.ack.state == state.value
        assert lifecycle.state is state and lifecycle.active is None


def test_acks_aggregate_into_one_reply() -> None:
    lifecycle = Lifecycle(control_timeout_s=1.0)
    act = lifecycle.begin(b"c", _control("pause"), running(0, 1, 2), now=0.0)
    assert not isinstance(act, protocol.ControlReply)
    ack = protocol.ControlAck(act.control_id, Signal.PAUSE, protocol.RankAck(0, True, EngineState.PAUSED))
    assert not lifecycle.on_ack(0, ack)
    assert not lifecycle.on_ack(0, ack), "a duplicate ack must not complete the control"
    busy = protocol.RankAck(1, False, EngineState.RUNNING, "busy")
    assert not lifecycle.on_ack(1, protocol.ControlAck(act.control_id, Signal.PAUSE, busy))
    assert lifecycle.on_rank_gone(2, "rank died: test")
    _, reply = lifecycle.finish()
    assert reply.control_id == 7 and not reply.ack.ok and reply.ack.state == "paused"
    assert [(a.rank, a.ok) for a in reply.ack.acks] == [(0, True), (1, False), (2, False)]
    assert reply.ack.acks[2].state is EngineState.RUNNING, "a dead rank is reported in its last known state"
    assert "rank 1: busy" in reply.ack.error and "rank 2" in reply.ack.error


def test_missing_acks_fail_at_the_deadline() -> None:
    lifecycle = Lifecycle(control_timeout_s=0.5)
    act = lifecycle.begin(b"c", _control("pause"), running(3), now=10.0)
    assert not isinstance(act, protocol.ControlReply)
    assert not lifecycle.expire(10.4)
    assert lifecycle.expire(10.6)
    _, reply = lifecycle.finish()
    assert (
        not reply.ack.ok and reply.ack.acks[0].rank == 3 and "no acknowledgement" in reply.ack.acks[0].error
    )


@pytest.mark.parametrize(
    ("signal", "args", "needle"),
    [
        ("reboot", {}, "unknown control signal"),
        ("update_weights", {}, "path"),
        ("stop", {"drain": "yes"}, "drain"),
        ("stop", {"deadline_s": -1}, "deadline_s"),
    ],
)
def test_bad_control_requests_get_error_replies(signal: str, args: dict, needle: str) -> None:
    lifecycle = Lifecycle(control_timeout_s=1.0)
    lifecycle.state = EngineState.PAUSED
    result = lifecycle.begin(b"c", _control(signal, args), running(0), now=0.0)
    assert isinstance(result, protocol.ControlReply) and not result.ack.ok and needle in result.ack.error


def test_shutdown_is_sent_to_ranks_as_an_aborting_stop() -> None:
    lifecycle = Lifecycle(control_timeout_s=1.0)
    act = lifecycle.begin(b"c", _control("shutdown"), running(0), now=0.0)
    assert not isinstance(act, protocol.ControlReply)
    msg = act.engine_message()
    assert msg.signal == "stop" and msg.args == {"drain": False, "deadline_s": 0.0}


# ---------------------------------------------------------------------------- codec


def test_fast_codec_accepts_what_the_protocol_encodes() -> None:
    frames = protocol.encode(protocol.Submit((protocol.SubmitEntry(5, -1, True),), (b"body",)))
    assert codec.peek_kind(frames[0]) == codec.KIND_SUBMIT
    assert codec.submit_entries(frames[0], 1) == ((5, -1, True, b"", 0),)
    frames = protocol.encode(protocol.EngineOutputs((protocol.EngineOutputEntry(9, False, 3),), (b"x",)))
    assert codec.peek_kind(frames[0]) == codec.KIND_ENGINE_OUTPUTS
    assert codec.engine_output_entries(frames[0], 1) == ((9, False, 3),)


def _garbage(rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 64))
    values = [None, True, 1.5, "s", b"b", -1, 2**70 if choice == 1 else 3, [], {}, [1, 2, 3], {"a": 1}]
    entry = [rng.choice(values) for _ in range(rng.randrange(0, 5))]
    kind = rng.choice([codec.KIND_SUBMIT, codec.KIND_ENGINE_OUTPUTS, 999, "2"])
    try:
        return msgpack.packb([kind, [entry] * rng.randrange(0, 3), *entry[:1]])
    except (OverflowError, TypeError):
        return b"\xc1"


def test_fast_codec_turns_garbage_into_protocol_errors_only() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        raw = _garbage(rng)
        try:
            codec.peek_kind(raw)
            codec.submit_entries(raw, rng.randrange(0, 3))
            codec.engine_output_entries(raw, rng.randrange(0, 3))
        except ProtocolError:
            continue


def test_wrong_field_types_are_rejected() -> None:
    with pytest.raises(ProtocolError, match=r"stream.*Expected `bool`, got `int`"):
        codec.submit_entries(msgpack.packb([2, [[1, -1, 1]]]), 1)  # stream must be a bool
    with pytest.raises(ProtocolError, match="bodies"):
        codec.submit_entries(msgpack.packb([2, [[1, -1, True]]]), 2)
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.peek_kind(b"\x92\x02" + b"\x00" * protocol.MAX_HEADER_BYTES)


# ---------------------------------------------------------------------------- keys, echo


def test_keys_make_a_complete_peer_directory(tmp_path) -> None:
    from dpinfer.protocol.curve import create_keys, peer_keys

    server, client = tmp_path / "server", tmp_path / "client"
    create_keys(str(server))
    public, _ = create_keys(str(client), "client", server_dir=str(server))
    assert (server / "authorized" / "client.key").read_bytes() == public.read_bytes()
    own_public, _, server_public = peer_keys(str(client))
    assert server_public != own_public and len(server_public) == 40


def test_streamed_echo_chunks_concatenate_to_the_final_text() -> None:
    body = protocol.pack_body({"prompt": "héllo wörld ✓ 😀 abc"})
    entries, bodies = EchoRequest(1, True, body).outputs(stream_chunks=3)
    outs = [protocol.OutputBody.from_bytes(b) for b in bodies]
    assert [e.final for e in entries] == [False, False, False, True]
    assert "".join(o.delta_text for o in outs) == outs[-1].text == "echo: héllo wörld ✓ 😀 abc"
    assert bytes(outs[-1].token_ids).decode() == outs[-1].text
    assert [e.num_tokens for e in entries] == sorted(e.num_tokens for e in entries)


def test_echo_of_a_bad_body_is_an_error_output() -> None:
    entries, bodies = EchoRequest(3, False, b"\xc1garbage").outputs(2)
    assert entries == [protocol.EngineOutputEntry(3, True, 0)]
    assert protocol.OutputBody.from_bytes(bodies[0]).finish_reason == "error"


# ---------------------------------------------------------------------------- commands, direct mode


def test_keys_command_writes_a_pair(tmp_path) -> None:
    from click.testing import CliRunner

    from dpinfer.cli import cli

    out = tmp_path / "k"
    result = CliRunner().invoke(cli, ["keys", "--out", str(out), "--name", "server"])
    assert result.exit_code == 0, result.output
    assert (out / "server.key").is_file() and (out / "server.key_secret").is_file()
    assert (out / "authorized").is_dir()


def test_coordinator_command_prints_its_address_and_exits_on_sigterm() -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "dpinfer", "coordinator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # the command prints its address once it listens
        assert line.startswith("coordinator listening on tcp://127.0.0.1:"), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_direct_null_engine_answers_requests_without_a_hub() -> None:
    import zmq

    from dpinfer.testing.null_direct import start_direct_null_engine

    proc, address = start_direct_null_engine()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        body = protocol.pack_body({"prompt": "direct"})
        sock.send_multipart(protocol.encode(protocol.Requests((protocol.RequestEntry(11, False),), (body,))))
        assert sock.poll(10_000), "the direct null engine did not answer"
        msg = protocol.decode(sock.recv_multipart())
        assert isinstance(msg, protocol.EngineOutputs)
        assert msg.entries == (protocol.EngineOutputEntry(11, True, len("echo: direct")),)
        assert protocol.OutputBody.from_bytes(msg.bodies[0]).text == "echo: direct"
    finally:
        sock.close()
        proc.kill()
        proc.join(5)


def test_a_taken_port_is_a_clear_error() -> None:
    import zmq

    from dpinfer.config import CoordinatorConfig
    from dpinfer.coordinator.server import Coordinator

    first = Coordinator(CoordinatorConfig(port=0))
    try:
        port = int(first.address.rsplit(":", 1)[1])
        with pytest.raises(zmq.ZMQError, match="in use"):
            Coordinator(CoordinatorConfig(port=port))
    finally:
        first.close()
