"""`dpinfer http` alone, in front of a coordinator with null ranks (fast, no model): a schema
fuzz run, several API workers on one port, 503 with no rank or no coordinator, and how each
failure a request can meet maps to its HTTP status.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from wire import Deployment

from dpinfer.http.errors import result_error
from dpinfer.outputs import GenerationResult

API_KEY = "fuzz-key"


class HttpProcess:
    """``python -m dpinfer http ARGS`` until its ready file names its URL."""

    def __init__(self, tmp: Path, args: list[str], timeout_s: float = 60.0) -> None:
        ready = tmp / "http-ready"
        self.log = tmp / "http.log"
        cmd = [sys.executable, "-m", "dpinfer", "http", "--port", "0", "--ready-file", str(ready), *args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout_s
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dpinfer http did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)  # another process's file: poll with a deadline
        self.url = ready.read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def null_deployment() -> Iterator[Deployment]:
    d = Deployment.start([0, 1], {0: {"stream_chunks": 3}, 1: {"stream_chunks": 3}})
    yield d
    d.close()


@pytest.fixture(scope="module")
def front(null_deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpProcess]:
    args = ["--coordinator", null_deployment.address, "--api-key", API_KEY, "--api-workers", "2"]
    process = HttpProcess(tmp_path_factory.mktemp("http"), args)
    yield process
    process.stop()
    assert process.proc.returncode == 0, process.log.read_text()[-3000:]


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {API_KEY}"}


def test_two_api_workers_share_one_port_and_both_serve(front: HttpProcess) -> None:
    pids = _worker_pids(front.proc.pid)
    assert len(pids) == 2, f"API workers: {pids}"
    # New connections are spread by the kernel: each of many fresh connections is served.
    for i in range(16):
        with httpx.Client(headers=_auth()) as http:  # a new connection each time
            reply = http.post(front.url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"].startswith("echo: ")
    assert _worker_pids(front.proc.pid) == pids


def test_a_completion_says_where_it_was_routed(front: HttpProcess) -> None:
    with httpx.Client(headers=_auth()) as http:
        reply = http.post(front.url + "/v1/completions", json={"prompt": "where", "max_tokens": 2})
    assert reply.status_code == 200
    assert reply.headers["x-dpinfer-routing"].startswith("policy=round_robin; rank=")


def test_a_streamed_completion_says_where_it_was_routed_in_its_headers(front: HttpProcess) -> None:
    body = {"prompt": "where", "max_tokens": 2, "stream": True}
    with (
        httpx.Client(headers=_auth()) as http,
        http.stream("POST", front.url + "/v1/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        assert reply.headers["x-dpinfer-routing"].startswith("policy=round_robin; rank=")
        assert reply.read().endswith(b"data: [DONE]\n\n")


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return sorted(
        int(p) for p in out.split() if Path(f"/proc/{p}/comm").read_text().startswith("dpinfer-http")
    )


def test_schema_fuzz_finds_no_server_error_and_the_front_keeps_serving(front: HttpProcess) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(front.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/pause"} <= paths
    failures: list[str] = []
    deadline = time.monotonic() + 25
    import requests

    with requests.Session() as session:
        for op in operations:
            hot = op.path.startswith("/v1/c")
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if time.monotonic() > deadline:
                    break

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=60 if hot else 8, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                def check(case: schemathesis.Case) -> None:
                    reply = case.call(base_url=front.url, session=session, headers=_auth(), timeout=30)
                    if reply.status_code >= 500:
                        failures.append(
                            f"{case.method} {case.path} -> {reply.status_code}: {reply.text[:300]}"
                        )

                try:
                    check()
                except Unsatisfiable:  # nothing to generate in this mode (no parameters to break)
                    pass
    assert not failures, "\n".join(failures[:10])
    health = httpx.get(front.url + "/health")
    assert health.status_code == 200, health.text
    reply = httpx.post(
        front.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3}, headers=_auth()
    )
    assert reply.status_code == 200, reply.text


def test_no_live_rank_is_503_and_health_says_so(coordinator_factory, tmp_path: Path) -> None:
    coordinator = coordinator_factory()
    process = HttpProcess(tmp_path, ["--coordinator", coordinator.address, "--timeout-s", "2"])
    try:
        health = httpx.get(process.url + "/health")
        assert health.status_code == 503 and "no engine rank" in health.json()["error"]["message"]
        reply = httpx.post(process.url + "/v1/completions", json={"prompt": "x"})
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "service_unavailable"
    finally:
        process.stop()


def test_unreachable_coordinator_is_503(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = HttpProcess(tmp_path, ["--coordinator", f"tcp://127.0.0.1:{port}", "--timeout-s", "0.5"])
    try:
        for path in ("/health", "/v1/completions"):
            reply = httpx.request(
                "GET" if path == "/health" else "POST", process.url + path, json={"prompt": "x"}
            )
            assert reply.status_code == 503, reply.text
            assert "unreachable" in reply.json()["error"]["message"] or "not connected" in reply.text
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("error_code", "error", "status"),
    [
        ("overloaded", "overloaded: the hub holds 65536 requests", 429),
        ("invalid_request", "invalid request: prompt is too long", 400),
        ("unavailable", "engines are stopped", 503),
        ("aborted", "the rank stopped", 503),
        ("internal", "tokenizer error: KeyError", 500),
        (None, "invalid request: prompt is empty", 400),
        (None, "no engine rank became available within 60 s", 503),
    ],
)
def test_each_failure_maps_to_its_status(error_code: str | None, error: str, status: int) -> None:
    result = GenerationResult(1, "", (), "error", error=error, error_code=error_code)
    api_error = result_error(result)
    assert api_error.status == status
    assert not api_error.message.startswith("invalid request:")
