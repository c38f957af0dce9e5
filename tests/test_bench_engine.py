"""``dpinfer bench engine --json`` at tiny sizes: it runs and reports the documented shape."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dpinfer.bench.engine import command
from dpinfer.bench.workloads import make_mixed, make_shared_prefix


def test_workloads_are_seeded_and_in_range() -> None:
    a = make_mixed(8, 384, (16, 32), (4, 8), seed=5)
    b = make_mixed(8, 384, (16, 32), (4, 8), seed=5)
    assert a == b
    assert all(16 <= len(p) <= 32 for p in a.prompts) and all(4 <= n <= 8 for n in a.output_lens)
    shared = make_shared_prefix(4, 384, 40, (2, 5), (3, 3), seed=5)
    assert all(p[:40] == shared.prompts[0][:40] for p in shared.prompts)


def test_bench_engine_json_shape() -> None:
    args = [
        "--threads=1",
        "--num-requests=6",
        "--prompt-len=8-40",
        "--output-len=2-6",
        "--prefix-len=48",
        "--suffix-len=2-6",
        "--shared-output-len=2-4",
        "--step-tokens=32",
        "--json",
    ]
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry logs
    assert report["torch_threads"] == 1
    assert report["step_tokens"] == 32 and report["mixed_steps"] is True
    assert report["decode_attention"] in ("kernel", "ragged")  # CPU: the C kernel where cc exists
    systems = {(c["workload"], c["system"]) for c in report["cases"]}
    assert systems == {
        ("mixed", "dpinfer"),
        ("mixed", "dpinfer_logprobs"),
        ("mixed", "hf_generate"),
        ("mixed", "dpinfer_rank"),
        ("shared_prefix", "dpinfer"),
        ("shared_prefix", "dpinfer_no_cache"),
    }
    for case in report["cases"]:
        for key in (
            "output_tok_per_s",
            "ttft_p50_ms",
            "tpot_p50_ms",
            "ttft_p99_ms",
            "tpot_p99_ms",
        ):
            assert isinstance(case[key], int | float) and case[key] >= 0, (case["system"], key)
        ratio = case["tpot_p99_over_p50"]  # null when p50 is 0 (tokens of a stream arrived together)
        assert ratio is None or ratio >= 1.0 or case["tpot_p50_ms"] == 0, case
        assert case["num_requests"] == 6
    mixed = [c for c in report["cases"] if c["workload"] == "mixed"]
    assert len({c["output_tokens"] for c in mixed}) == 1, "same requested tokens on every system"
    assert set(report["speedup"]) == {
        "mixed",
        "shared_prefix",
        "mixed_through_rank",
        "logprobs",
        "logprobs_cpu",
    }
    assert all(v > 0 for v in report["speedup"].values())
    matmul = report["matmul"]
    assert matmul["system"] == "dpinfer" and matmul["body_params"] > 0 and matmul["head_params"] > 0
    assert 0 < report["matmul_peak_fraction"] == matmul["matmul_peak_fraction"] < 1.5
    assert matmul["model_gflop"] > 0 and matmul["body_gflop_per_s"] > 0
    assert report["targets"]["matmul_peak_fraction"] == 0.7 and report["targets"]["mixed_through_rank"] == 3.0
    cached = {c["system"]: c["cached_tokens"] for c in report["cases"] if c["workload"] == "shared_prefix"}
    assert cached["dpinfer"] > 0 and cached["dpinfer_no_cache"] == 0


def test_breakdown_clock_times_each_part_exclusively() -> None:
    from dpinfer.bench.engine_breakdown import _Clock

    ticks = iter([0.0, 1.0, 3.0, 4.0, 4.5, 10.0])  # model [0, 10]: linear [1, 3], norm [4, 4.5]
    clock = _Clock(now=lambda: next(ticks))
    clock.enter()
    clock.enter()
    clock.leave("linear")
    clock.enter()
    clock.leave("norm")
    assert clock.leave("other_forward") == 10.0
    assert clock.seconds == {"linear": 2.0, "norm": 0.5, "other_forward": 7.5}


def test_bench_engine_breakdown() -> None:
    from dpinfer.bench.engine_breakdown import PARTS

    args = ["--workload=mixed", "--no-through-rank", "--breakdown", "--num-requests=4"]
    args += ["--prompt-len=8-40", "--output-len=3-6", "--step-tokens=32", "--json"]
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    breakdown = json.loads(result.stdout)["breakdown"]
    parts = breakdown["parts"]
    assert tuple(parts) == PARTS and all(p["seconds"] >= 0 for p in parts.values())
    assert parts["linear"]["seconds"] > 0 and parts["attention"]["seconds"] > 0
    total = sum(p["seconds"] for p in parts.values())
    assert abs(total - breakdown["duration_s"]) <= 0.02 + 0.01 * breakdown["duration_s"]
    steps = breakdown["steps"]
    assert sum(b["steps"] for b in steps) >= 6, "at least one pass per token of the longest request"
    assert all(b["matmul_peak_fraction"] > 0 for b in steps) and breakdown["linear_ceiling"] > 0
    assert all(0 <= b["linear_s"] <= b["seconds"] and b["bound"] in ("compute", "memory") for b in steps)
    assert breakdown["stream_gb_per_s"] > 0 and breakdown["roofline_s"] > 0
    # roofline_s is rounded to 10 ms, the fraction to 0.001 of the wall time
    assert abs(breakdown["roofline_fraction"] * breakdown["duration_s"] - breakdown["roofline_s"]) <= 0.01


def test_roofline_bounds_a_pass_by_its_matmuls_then_its_attention() -> None:
    from dpinfer.bench.engine_breakdown import _Pass, _Roofline
    from dpinfer.bench.matmul_peak import MatmulPeak

    # 1 GFLOP per body row at 100 GFLOP/s; 2 GB of weights and 1 GB of KV at 10 GB/s
    peak: MatmulPeak = {
        "body_gflop_per_s": 100.0,
        "head_gflop_per_s": 100.0,
        "body_params": 500_000_000,
        "head_params": 0,
    }
    roof = _Roofline(peak, stream_gb_per_s=10.0, weight_bytes=2_000_000_000)
    small = _Pass(rows=10, logits_rows=10, seconds=1.0, linear_s=0.5, kv_bytes=1_000_000_000)
    large = _Pass(rows=30, logits_rows=1, seconds=1.0, linear_s=0.5, kv_bytes=1_000_000_000)
    assert roof.bound(small) == (pytest.approx(0.2 + 0.1), "memory")  # weights outlast 0.1 s of FLOPs
    assert roof.bound(large) == (pytest.approx(0.3 + 0.1), "compute")


def test_kv_bytes_counts_contexts_read_once_and_new_tokens_written() -> None:
    import torch

    from dpinfer.bench.engine_breakdown import kv_bytes
    from dpinfer.runner.attention import ExtendSeq, ForwardBatch, ForwardMode
    from dpinfer.runner.kv_pool import KVLayout, KVPool

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    pool = KVPool(layout, 64, torch.device("cpu"))
    per_token = pool.layout.bytes_per_token
    ids = torch.zeros(2 + 5, dtype=torch.int64)  # two decodes (contexts 7 and 3), a 5-token chunk
    batch = ForwardBatch(
        ForwardMode.MIXED, pool, ids, ids, ids, kv_lens=torch.tensor([8, 4]), num_decode=2,
        extend_seqs=[ExtendSeq(q_start=2, q_len=5, prefix_len=6)],
    )  # fmt: skip
    assert kv_bytes(batch) == (7 + 3 + 6 + 7) * per_token
