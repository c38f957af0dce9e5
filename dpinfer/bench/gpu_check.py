"""``dpinfer bench gpu-check`` (``make gpu-check``): every CUDA path, one after another, one table.

On a machine with CUDA, in about 8 minutes at most (each step has its own time limit):

1. ``tests``: the CUDA tests (``pytest -m cuda``; they skip elsewhere);
2. ``transport``: ``dpinfer bench transport`` with ``cuda_ipc_pool`` beside the CPU path
   (``shm``) and raw ``cuda_ipc``, plus 10,000 pool transfers that must leave GPU memory
   where it started (``--leak-transfers``);
3. ``engine``: ``dpinfer bench engine --model smollm2-135m --device cuda --dtype bfloat16``
   on ``mixed`` (through a rank too);
4. ``serve``: ``dpinfer serve --dp 1 --device cuda`` answering one chat request over HTTP.

Each step runs in a process of its own, so one failure (or hang) never stops the others;
the summary table lists every step's outcome and headline figures, and the exit status is
non-zero when any step failed. Without CUDA it says so and exits 0 having run nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from dpinfer.bench.report import Column, render_table

SERVE_MODEL = "smollm2-135m"


@dataclass
class StepResult:
    step: str
    ok: bool
    seconds: float
    summary: str


def _run_json(cmd: list[str], timeout_s: float) -> tuple[bool, dict[str, object] | None, str]:
    """Run ``cmd`` (which prints one JSON report); (exit ok, the report, the output tail)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, None, f"timed out after {timeout_s:.0f}s"
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = None
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return proc.returncode == 0, report, " | ".join(tail)


def step_tests(timeout_s: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f}s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode == 0, lines[-1] if lines else "no output"


def step_transport(timeout_s: float) -> tuple[bool, str]:
    cmd = [
        sys.executable, "-m", "dpinfer", "bench", "transport", "--json", "--sizes", "16,64", "--rounds", "2",
        "--methods", "memcpy,shm,cuda_ipc,cuda_ipc_pool,default_gpu", "--leak-transfers", "10000",
    ]  # fmt: skip
    ok, report, tail = _run_json(cmd, timeout_s)
    if report is None:
        return False, tail
    cases = report["cases"]
    assert isinstance(cases, list)
    at = {(c["method"], c["size_bytes"]): c["gb_per_s"] for c in cases}
    big = max(c["size_bytes"] for c in cases)
    parts = [f"{m} {at[m, big]:.1f}" for m in ("shm", "cuda_ipc", "cuda_ipc_pool") if (m, big) in at]
    leak = report.get("leak")
    leak_ok = isinstance(leak, dict) and bool(leak.get("ok"))
    if isinstance(leak, dict):
        parts.append(
            f"leak {leak['transfers']} x 1 MiB: alloc {leak['allocated_delta_bytes']:+d} B, "
            f"free {leak['device_free_delta_bytes']:+d} B"
        )
    return ok and leak_ok, f"GB/s at {big >> 20} MiB: " + ", ".join(parts)


def step_engine(timeout_s: float) -> tuple[bool, str]:
    cmd = [
        sys.executable, "-m", "dpinfer", "bench", "engine", "--json", "--model", SERVE_MODEL,
        "--device", "cuda", "--dtype", "bfloat16", "--workload", "mixed", "--step-tokens", "2048",
    ]  # fmt: skip
    ok, report, tail = _run_json(cmd, timeout_s)
    if report is None:
        return False, tail
    speedup = report["speedup"]
    cases = report["cases"]
    assert isinstance(speedup, dict) and isinstance(cases, list)
    rank: dict[str, object] = next((c for c in cases if c["system"] == "dpinfer_rank"), {})
    return ok, (
        f"x generate: {speedup.get('mixed')} in process, {speedup.get('mixed_through_rank')} through a rank; "
        f"rank TPOT p99/p50 {rank.get('tpot_p99_over_p50')}; "
        f"matmul_peak_fraction {report.get('matmul_peak_fraction')}"
    )


def step_serve(timeout_s: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="dpinfer-gpu-check-") as tmp:
        ready = Path(tmp) / "ready"
        cmd = [
            sys.executable, "-m", "dpinfer", "serve", "--dp", "1", "--device", "cuda", "--dtype", "bfloat16",
            "--model", SERVE_MODEL, "--port", "0", "--http-port", "0", "--ready-file", str(ready),
            "--log-file", str(Path(tmp) / "ranks.log"),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            return _one_chat(proc, ready, timeout_s - 15.0, 15.0)
        finally:
            _stop(proc)


def _one_chat(
    proc: subprocess.Popen[bytes], ready: Path, ready_s: float, answer_s: float
) -> tuple[bool, str]:
    deadline = time.monotonic() + ready_s
    while not (ready.exists() and len(ready.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            return False, f"serve exited with {proc.returncode}: {err.strip()[-200:]}"
        if time.monotonic() > deadline:
            return False, f"not ready within {ready_s:.0f}s"
        time.sleep(0.5)
    url = ready.read_text().splitlines()[1].rstrip("/")
    body = {
        "model": SERVE_MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=answer_s) as response:
        answer = json.loads(response.read())
    text = answer["choices"][0]["message"]["content"]
    return bool(text.strip()), f"answered {text.strip()[:60]!r}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the deployment (it drains and stops), then kill its group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


STEPS: list[tuple[str, Callable[[float], tuple[bool, str]], float]] = [
    ("tests", step_tests, 120.0),
    ("transport", step_transport, 120.0),
    ("engine", step_engine, 150.0),
    ("serve", step_serve, 75.0),
]
"""Each step and its time limit (serve: start-up, then 15 s for the answer): under 8 minutes."""


def run_steps() -> list[StepResult]:
    results = []
    for name, step, limit in STEPS:
        click.echo(f"gpu-check: {name} (at most {limit:.0f}s) ...", err=True)
        t0 = time.monotonic()
        try:
            ok, summary = step(limit)
        except Exception as e:  # noqa: BLE001 -- one step failing must not hide the others
            ok, summary = False, f"{type(e).__name__}: {e}"
        results.append(StepResult(name, ok, round(time.monotonic() - t0, 1), summary))
    return results


@click.command("gpu-check")
def command() -> None:
    """Every CUDA path on this machine's GPU, one after another, then one summary table."""
    import torch

    if not torch.cuda.is_available():
        click.echo("gpu-check: skipped, no CUDA device on this machine (nothing was run)")
        return
    from rich.console import Console

    click.echo(f"gpu-check on {torch.cuda.get_device_name(0)}", err=True)
    results = run_steps()
    columns = [
        Column("step", "step", "{}", justify="left"),
        Column("result", "result", "{}", justify="left"),
        Column("seconds", "s", "{:.1f}"),
        Column("summary", "summary", "{}", justify="left"),
    ]
    rows = [{**vars(r), "result": "ok" if r.ok else "FAILED"} for r in results]
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(render_table(f"gpu-check: {torch.cuda.get_device_name(0)}", columns, rows))
    if not all(r.ok for r in results):
        raise SystemExit(1)
