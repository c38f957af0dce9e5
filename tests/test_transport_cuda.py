"""GPU tensor transport (cuda_ipc, cuda_ipc_pool, default) through the channel; needs CUDA."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import torch

from dpinfer.config import TransportConfig, ipc_address, new_deployment_id
from dpinfer.transport import make_receiver, make_sender
from dpinfer.transport.codec import TensorEncoder
from dpinfer.transport.shm import list_segments

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CTX = mp.get_context("spawn")


def receiver_main(cfg: TransportConfig, address: str, dep: str, n: int, conn: Any) -> None:
    receiver = make_receiver(cfg, address, dep, 0)
    conn.send("ready")
    got: list[Any] = []
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        receiver.socket.poll(100)
        got.extend(receiver.recv_ready())
    conn.send([(m["i"], m["x"].device.type, float(m["x"].double().sum())) for m in got])
    del got
    receiver.close()


@pytest.mark.parametrize("mode", ["default", "cuda_ipc", "cuda_ipc_pool"])
def test_gpu_tensors_cross_processes(mode: str) -> None:
    cfg = TransportConfig(transport="shm", tensor_transport=mode, cuda_pool_bytes=8 << 20)
    dep = new_deployment_id()
    address = ipc_address(dep, 0, "gpu")
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=receiver_main, args=(cfg, address, dep, 12, child))
    proc.start()
    try:
        assert parent.poll(120) and parent.recv() == "ready"
        sender = make_sender(cfg, address, dep, 0)
        sent = []
        for i in range(12):  # 12 x 1 MiB through an 8 MiB pool: chunks must be recycled
            x = torch.randn(256 * 1024, device="cuda")
            sent.append((i, float(x.double().sum())))
            sender.send({"i": i, "x": x})
        assert parent.poll(120)
        got = parent.recv()
        stats = sender.stats()
        sender.close()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [(i, s) for i, _, s in got] == pytest.approx(sent)
    expected_device = "cpu" if mode == "default" else "cuda"
    assert all(device == expected_device for _, device, _ in got)
    if mode == "cuda_ipc_pool":
        assert stats["num_pool"] + stats["num_pool_full"] >= 12
    assert list_segments(dep) == []


def test_cuda_ipc_mode_pickles_a_handle() -> None:
    x = torch.randn(1 << 20, device="cuda")
    encoder = TensorEncoder(inline_bytes=0, tensor_transport="cuda_ipc")
    data, handles = encoder.dumps({"x": x})
    assert handles == [] and encoder.stats()["num_cuda_ipc"] == 1
    assert len(data) < 4096, "the pickle carried tensor data instead of an IPC handle (TransportProxyTensor)"
