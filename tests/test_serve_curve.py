"""A deployment with CURVE on: keyed peers are served, keyless ones get nothing, and the
deployment's own key (for its status and stop calls) is removed when it stops."""

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
        own_key = server / "authorized" / f"serve-{config.deployment_id}.key"
        assert own_key.exists(), "the deployment needs a key of its own to reach its coordinator"
        with InferenceClient(address, timeout_s=30, curve_dir=str(peer)) as client:
            (result,) = client.generate("hello", SamplingParams(max_new_tokens=4, temperature=0.0))
        assert result.ok and result.rank == 0, result
        with pytest.raises(DpinferError):
            InferenceClient(address, timeout_s=2)  # no key: the handshake never completes
    finally:
        deployment.stop()
    assert not own_key.exists(), "the deployment's key outlived it"
    assert sorted(os.listdir(server / "authorized")) == ["peer.key"]
