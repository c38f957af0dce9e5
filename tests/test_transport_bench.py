"""``dpinfer bench transport --json`` runs end to end on tiny sizes and reports every case."""

from __future__ import annotations

import json

from click.testing import CliRunner

from dpinfer.bench.transport import command


def test_bench_transport_json_shape() -> None:
    result = CliRunner().invoke(command, ["--sizes", "0.5,1", "--iters", "3", "--rounds", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry logs
    cases = report["cases"]
    methods = {c["method"] for c in cases}
    assert {"memcpy", "pickle_zmq", "shm", "tensor_queue"} <= methods
    assert len(cases) == 2 * len(methods)
    for case in cases:
        assert set(case) == {"method", "size_bytes", "gb_per_s", "ratio_vs_memcpy"}
        assert case["size_bytes"] in (1 << 19, 1 << 20)
        assert case["gb_per_s"] > 0
    assert all(c["ratio_vs_memcpy"] == 1.0 for c in cases if c["method"] == "memcpy")
    if not report["cuda"]:
        assert any("no CUDA" in note for note in report["notes"])


def test_bench_transport_rejects_unknown_method() -> None:
    result = CliRunner().invoke(command, ["--methods", "memcpy,carrier_pigeon"])
    assert result.exit_code != 0 and "carrier_pigeon" in result.output


def test_leak_check_needs_cuda_and_enough_transfers() -> None:
    import torch

    result = CliRunner().invoke(command, ["--leak-transfers", "50"])
    assert result.exit_code != 0 and "--leak-transfers" in result.output
    if torch.cuda.is_available():
        return  # the leak check itself runs in make gpu-check
    args = [
        "--sizes",
        "0.5",
        "--iters",
        "2",
        "--rounds",
        "1",
        "--methods",
        "memcpy",
        "--leak-transfers",
        "200",
    ]
    result = CliRunner().invoke(command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["leak"] is None and any("leak check" in note for note in report["notes"])


def test_gpu_check_skips_cleanly_without_cuda() -> None:
    import torch

    from dpinfer.bench.gpu_check import STEPS
    from dpinfer.bench.gpu_check import command as gpu_check

    assert sum(limit for _, _, limit in STEPS) < 8 * 60, "make gpu-check fits in 8 minutes"
    if torch.cuda.is_available():
        return
    result = CliRunner().invoke(gpu_check, [])
    assert result.exit_code == 0 and "no CUDA device" in result.output
