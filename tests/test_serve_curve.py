"""A deployment with CURVE on: keyed peers are served, keyless ones get nothing, and the
deployment's own key (for its status and stop calls) is removed when it stops. Started on an
empty directory, it creates every key it needs, by role."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

from dpinfer import InferenceClient, SamplingParams
from dpinfer.config import CoordinatorConfig
from dpinfer.errors import DpinferError
from dpinfer.launcher.deployment import Deployment, ServeConfig
from dpinfer.protocol.curve import create_keys

pytestmark = [
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE"),
    pytest.mark.timeout(240),
]


def test_curve_deployment_serves_keyed_peers_only(tmp_path: Path) -> None:
    server, peer = tmp_path / "server", tmp_path / "peer"
    create_keys(str(server))
    create_keys(str(peer), "peer", str(server))
    config = ServeConfig(
        dp=1,
        coordinator=CoordinatorConfig(port=0, curve_dir=str(server)),
        engine_args=("--model", "tiny-llama", "--device", "cpu", "--kv-cache-bytes", str(16 << 20),
                     "--rank-curve-dir", str(peer)),
        threads_per_rank=1,
        ready_timeout_s=180,
    )  # fmt: skip
    deployment = Deployment(config)
    try:
        address = deployment.start()
        own_key = server / "authorized" / "admins" / f"serve-{config.deployment_id}.key"
        assert own_key.exists(), "the deployment needs a key of its own to reach its coordinator"
        with InferenceClient(address, timeout_s=30, curve_dir=str(peer)) as client:
            (result,) = client.generate("hello", SamplingParams(max_new_tokens=4, temperature=0.0))
        assert result.ok and result.rank == 0, result
        with pytest.raises(DpinferError):
            InferenceClient(address, timeout_s=2)  # no key: the handshake never completes
    finally:
        deployment.stop()
    assert not own_key.exists(), "the deployment's key outlived it"
    assert (server / "authorized" / "peer.key").exists(), "the operator's keys are left alone"
    assert sorted(os.listdir(server / "authorized" / "admins")) == ["admin.key"]


def test_serve_curve_on_an_empty_directory_creates_the_keys_it_needs_by_role(tmp_path: Path) -> None:
    from dpinfer.client.session import ControlError

    keys = tmp_path / "keys"
    config = ServeConfig(
        dp=1,
        coordinator=CoordinatorConfig(port=0, curve_dir=str(keys)),
        engine_args=("--model", "tiny-llama", "--device", "cpu", "--kv-cache-bytes", str(16 << 20)),
        threads_per_rank=1,
        ready_timeout_s=180,
    )  # fmt: skip
    deployment = Deployment(config)
    try:
        address = deployment.start()  # the ranks registered with the rank key it created
        assert (keys / "server.key_secret").exists()
        for role, subdir in (("rank", "ranks"), ("client", "clients"), ("admin", "admins")):
            assert (keys / "peers" / role / f"{role}.key_secret").exists()
            assert (keys / "peers" / role / "server.key").exists()
            assert (keys / "authorized" / subdir / f"{role}.key").exists()
        with InferenceClient(address, timeout_s=30, curve_dir=str(keys / "peers" / "client")) as client:
            (result,) = client.generate("hello", SamplingParams(max_new_tokens=4, temperature=0.0))
            assert result.ok, result
            with pytest.raises(ControlError, match="admin key"):
                client.pause_engines()
        with InferenceClient(address, timeout_s=30, curve_dir=str(keys / "peers" / "admin")) as admin:
            assert admin.pause_engines().ok and admin.unpause_engines().ok
    finally:
        deployment.stop()
    assert sorted(os.listdir(keys / "authorized" / "admins")) == ["admin.key"], "its own key is gone"
