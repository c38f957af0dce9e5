"""The client-side CLI commands (``dpinfer status/pause/.../generate``) through click's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zmq
from click.testing import CliRunner, Result
from wire import Deployment

from dpinfer.cli import cli

pytestmark = pytest.mark.timeout(60)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_status_json_and_table(deployment: Deployment) -> None:
    result = invoke("status", "--address", deployment.address, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)  # stderr may carry logs
    assert status["state"] == "running" and sorted(r["rank"] for r in status["ranks"]) == [0, 1]
    table = invoke("status", "--address", deployment.address)
    assert table.exit_code == 0 and "2 rank(s)" in table.output and "running" in table.output


def test_pause_unpause_and_an_invalid_transition(deployment: Deployment) -> None:
    address = deployment.address
    paused = invoke("pause", "--address", address, "--json")
    try:
        assert paused.exit_code == 0, paused.output
        ack = json.loads(paused.output)
        assert ack["ok"] and ack["state"] == "paused" and sorted(a["rank"] for a in ack["acks"]) == [0, 1]
        again = invoke("pause", "--address", address)
        assert again.exit_code != 0 and "paused" in again.output
    finally:
        unpaused = invoke("unpause", "--address", address)
    assert unpaused.exit_code == 0 and "unpause -> running" in unpaused.output


def test_generate_plain_json_and_stream(deployment: Deployment) -> None:
    address = deployment.address
    plain = invoke("generate", "hi there", "--address", address, "--max-new-tokens", "4")
    assert plain.exit_code == 0 and plain.output.splitlines()[0] == "echo: hi there"
    as_json = json.loads(invoke("generate", "hi", "--address", address, "--json").output)
    assert as_json["text"] == "echo: hi" and as_json["finish_reason"] == "stop"
    streamed = invoke("generate", "streamed", "--address", address, "--stream", "--json")
    lines = [json.loads(line) for line in streamed.output.splitlines()]
    assert "".join(line["text"] for line in lines) == "echo: streamed" and lines[-1]["finished"]
    chat = invoke("generate", "yo", "--address", address, "--chat", "--temperature", "0")
    assert chat.exit_code == 0 and "echo: yo" in chat.output
    bad = invoke("generate", "x", "--address", address, "--top-p", "2")
    assert bad.exit_code != 0 and "top_p" in bad.output
    three = invoke("generate", "n", "--address", address, "-n", "3")
    assert three.exit_code == 0 and three.stdout.count("echo: n") == 3, three.output
    assert "--- completion 2 ---" in three.stdout
    listed = json.loads(invoke("generate", "n", "--address", address, "-n", "2", "--json").stdout)
    assert [r["index"] for r in listed] == [0, 1] and len({r["rank"] for r in listed}) == 1
    refused = invoke("generate", "n", "--address", address, "-n", "2", "--stream")
    assert refused.exit_code != 0 and "drop --stream" in refused.output


def test_unreachable_coordinator_exits_non_zero_with_a_hint() -> None:
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.bind("tcp://127.0.0.1:*")
    address = silent.last_endpoint.decode()
    try:
        result = invoke("pause", "--address", address, "--timeout-s", "0.3")
    finally:
        silent.close(linger=0)
    assert result.exit_code == 1
    assert f"no coordinator answered at {address} within 0.3 s" in result.output
    assert "dpinfer coordinator" in result.output and "Traceback" not in result.output


def test_cli_help_does_not_import_torch() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from dpinfer.cli import cli; "
        "r = CliRunner().invoke(cli, ['generate', '--help']); "
        "assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
