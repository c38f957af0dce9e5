"""``dpinfer bench http`` with tiny counts: the report's shape and that every request succeeded,
never its timings; and the load client's request bytes."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from dpinfer.bench.http import STREAM_TOKENS, TARGETS, _Way, command
from dpinfer.bench.http_load import Job, JobResult, LoadProcess, request_bytes

pytestmark = pytest.mark.timeout(120)

CASE_KEYS = {
    "case", "api_workers", "req_per_s", "p50_ms", "p99_ms", "tokens_per_s",
    "front_cpu_us_per_req", "front_cpu_us_per_token",
}  # fmt: skip


def test_benchmark_json_shape_and_every_request_succeeds() -> None:
    args = ["--requests", "200", "--stream-requests", "32", "--concurrency", "16"]
    args += ["--latency-requests", "20", "--rounds", "1", "--api-workers", "1", "--api-workers", "2"]
    result = CliRunner().invoke(command, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr may carry logs
    cases = report["cases"]
    assert [(c["case"], c["api_workers"]) for c in cases] == [
        ("sdk", None),
        ("http", 1),
        ("http", 2),
        ("http_stream", 1),
        ("http_stream", 2),
    ]
    for case in cases:
        assert set(case) >= CASE_KEYS, f"{case['case']} lacks {CASE_KEYS - set(case)}"
        if case["case"] != "http_stream":
            assert case["req_per_s"] > 0 and 0 < case["p50_ms"] <= case["p99_ms"]
        if case["case"] != "http":
            assert case["tokens_per_s"] > 0
    by = {(c["case"], c["api_workers"]): c for c in cases}
    # A failed request stops the run, so a report means every one succeeded; and all were counted:
    # one throughput round plus the latency run, or the streams.
    assert by[("sdk", None)]["requests"] == 200 + 20 + 32
    assert by[("http", 1)]["requests"] == 200 + 20
    assert by[("http_stream", 2)]["requests"] == 32
    # The front's CPU is per request without streaming and per token with it; the SDK has no front.
    assert by[("http", 1)]["front_cpu_us_per_req"] > 0 and by[("http", 1)]["front_cpu_us_per_token"] is None
    assert by[("http_stream", 1)]["front_cpu_us_per_token"] > 0
    assert by[("http_stream", 1)]["req_per_s"] is None
    assert by[("sdk", None)]["front_cpu_us_per_req"] is None
    assert report["targets"] == json.loads(json.dumps(TARGETS))
    assert [c["target"] for c in report["checks"]] == [k for k in TARGETS if k != "peer"]
    assert report["two_worker_scaling"] > 0
    assert report["settings"]["stream_tokens"] == STREAM_TOKENS
    assert {"cpus", "load_avg_1m", "python", "platform"} <= set(report["machine"])


def test_request_bytes_are_one_complete_http_request() -> None:
    job = Job("http", "127.0.0.1:8000", "null", "abcdefgh", 4, True, 1, 1)
    raw = request_bytes(job)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"model": "null", "prompt": "abcdefgh", "max_tokens": 4, "stream": True}


class _FailingLoad(LoadProcess):
    """A load process that is never started and whose every request fails."""

    def __init__(self) -> None:
        self.pid = 0

    def run(self, job: Job, pids: list[int]) -> tuple[JobResult, list[float]]:
        result = JobResult()
        result.fail("HTTP 503: no engine rank is serving", job.num_requests)
        return result, [0.0] * len(pids)


def test_a_failed_request_stops_the_benchmark_saying_which() -> None:
    way = _Way("http", "127.0.0.1:1", api_workers=2, front_pids=[1, 2])
    job = Job("http", way.target, "null", "abcdefgh", 4, False, 3, 1)
    with pytest.raises(click.ClickException, match=r"3 of 3 requests through http \(2 API workers\) failed; "
                       r"the first: HTTP 503"):  # fmt: skip
        way.run(_FailingLoad(), 0, job)
