"""CURVE roles: a rank key registers, a client key submits and reads status, an admin key also
sends control signals; nothing else passes (issue 9, case 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from wire import WireClient, live_ranks

from dpinfer import protocol
from dpinfer.protocol.curve import Role, create_keys


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    server = str(tmp_path / "server")
    create_keys(server)
    dirs = {"server": server}
    for role in (Role.RANK, Role.CLIENT, Role.ADMIN):
        dirs[role.value] = str(tmp_path / role.value)
        create_keys(dirs[role.value], role.value, server_dir=server, role=role)
    return dirs


def test_each_key_does_what_its_role_allows(keys: dict[str, str], coordinator_factory, null_ranks) -> None:
    handle = coordinator_factory(curve_dir=keys["server"])
    handle.client_curve_dir = keys["admin"]
    null_ranks(handle.address, [0], curve_dir=keys["rank"])
    client = WireClient(handle.address, curve_dir=keys["client"], name="client")
    admin = WireClient(handle.address, curve_dir=keys["admin"], name="admin")
    as_rank = WireClient(handle.address, curve_dir=keys["rank"], hello=False, name="rank-as-client")
    try:
        status = client.wait_live([0])
        # A client key submits and reads status...
        (result,) = client.wait_results(client.submit(["hi"]))
        assert result.final.text == "echo: hi"
        # ...but cannot send a control signal, SHUTDOWN included.
        for signal in ("pause", "shutdown"):
            refused = client.control(signal)
            assert not refused.ok and "admin key" in refused.error and refused.acks == ()
        assert client.status()["state"] == "running"
        # A rank key cannot act as a client: no handshake, so no control signal either.
        as_rank.send(protocol.ClientHello(protocol.PROTOCOL_VERSION, "rank-as-client"))
        as_rank.wait_for(lambda: bool(as_rank.errors), 5, "the refusal")
        assert as_rank.errors[-1].code == "forbidden" and not as_rank.hello_acks
        as_rank.send(protocol.Control(1, "pause", {}))
        as_rank.wait_for(lambda: len(as_rank.errors) >= 2, 5, "the second refusal")
        assert as_rank.errors[-1].code == "not_handshaken" and not as_rank.control_replies
        # An admin key can.
        paused = admin.control("pause")
        assert paused.ok and [(a.rank, a.ok) for a in paused.acks] == [(0, True)]
        assert admin.control("unpause").ok
        status = admin.status()
        assert status["counters"]["forbidden"] >= 1 and live_ranks(status) == {0}
    finally:
        for c in (client, admin, as_rank):
            c.close()


def test_client_and_admin_keys_cannot_register_as_a_rank(
    keys: dict[str, str], coordinator_factory, null_ranks
) -> None:
    handle = coordinator_factory(curve_dir=keys["server"])
    handle.client_curve_dir = keys["admin"]
    for i, role in enumerate(("client", "admin")):
        null_ranks(handle.address, [i], curve_dir=keys[role], connect_timeout_s=3)
    admin = WireClient(handle.address, curve_dir=keys["admin"], name="admin")
    try:
        status = admin.wait_ranks(lambda s: s["counters"]["forbidden"] >= 2, what="two refused Registers")
        assert live_ranks(status) == set(), "only a rank key may register"
    finally:
        admin.close()


def test_keys_command_authorizes_by_role(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dpinfer.cli import cli

    server, admin = tmp_path / "server", tmp_path / "admin"
    runner = CliRunner()
    assert runner.invoke(cli, ["keys", "--out", str(server)]).exit_code == 0
    args = ["keys", "--out", str(admin), "--name", "ops", "--server-dir", str(server)]
    refused = runner.invoke(cli, args)
    assert refused.exit_code != 0 and "--role" in refused.output, "a peer key's role must be chosen"
    ok = runner.invoke(cli, [*args, "--role", "admin"])
    assert ok.exit_code == 0, ok.output
    assert (server / "authorized" / "admins" / "ops.key").is_file() and (admin / "server.key").is_file()


def test_listening_beyond_loopback_needs_curve_or_insecure() -> None:
    from click.testing import CliRunner

    from dpinfer.cli import cli

    result = CliRunner().invoke(cli, ["coordinator", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code != 0
    assert "--curve" in result.output and "--insecure" in result.output


def test_serve_beyond_loopback_needs_curve_or_insecure() -> None:
    from click.testing import CliRunner

    from dpinfer.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--model", "tiny-llama"])
    assert result.exit_code != 0 and "--insecure" in result.output, result.output
