"""``dpinfer bench coordinator`` with tiny counts: the report's shape, not its timings."""

from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner

from dpinfer.bench.coordinator import command
from dpinfer.bench.report import latency_summary_us, percentile, process_cpu_s

pytestmark = pytest.mark.timeout(120)


def test_benchmark_json_shape() -> None:
    args = ["--ranks", "1", "--ranks", "2", "--requests", "300", "--concurrency", "16"]
    args += ["--latency-requests", "20", "--rounds", "2"]
    result = CliRunner().invoke(command, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry logs
    assert [(c["case"], c["ranks"]) for c in report["cases"]] == [
        ("direct", 1),
        ("bare_relay", 1),
        ("coordinator", 1),
        ("coordinator", 2),
    ]
    for case in report["cases"]:
        assert set(case) >= {"case", "ranks", "req_per_s", "p50_us", "p99_us", "coordinator_cpu_us_per_req"}
        assert case["req_per_s"] > 0 and 0 < case["p50_us"] <= case["p99_us"]
        # The direct rank is measured alongside every coordinator case: 2 rounds each.
        assert len(case["req_per_s_rounds"]) == (4 if case["case"] == "direct" else 2)
        assert max(case["req_per_s_rounds"]) == case["req_per_s"]
        if case["case"] == "direct":
            assert case["coordinator_cpu_us_per_req"] is None
        else:
            assert case["coordinator_cpu_us_per_req"] > 0 and "added_p50_us" in case
        if case["case"] == "coordinator":
            assert "added_p50_over_relay_us" in case
    one_rank = report["cases"][2]
    assert report["ratio_vs_direct"] == one_rank["ratio_vs_direct"] > 0
    assert report["sdk"]["sync_p50_us"] > 0 and report["sdk"]["async_req_per_s"] > 0


def test_report_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))
    summary = latency_summary_us([0.001] * 99 + [0.1])
    assert summary["p50_us"] == 1000.0 and summary["p99_us"] > 1000.0
    assert process_cpu_s(os.getpid()) > 0


def test_cache_aware_runs_beside_round_robin_on_the_same_keyed_load() -> None:
    args = ["--ranks", "2", "--requests", "300", "--concurrency", "16", "--latency-requests", "20"]
    args += ["--rounds", "1", "--routing", "cache_aware", "--json"]
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    hubs = [(c["ranks"], c["routing"]) for c in report["cases"] if c["case"] == "coordinator"]
    assert hubs == [(2, "round_robin"), (2, "cache_aware")]
    assert report["cache_aware_cpu_vs_round_robin"] > 0
