"""``dpinfer top`` and ``dpinfer status`` as a person sees them: the figures behind the view,
one frame at 80 columns, and the live view in a real pseudo-terminal (``q`` quits, the
terminal comes back as it was)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
from click.testing import CliRunner
from wire import Deployment

from dpinfer.cli import cli
from dpinfer.client.top import Watch, quantile
from dpinfer.scheduler.metrics import MetricsRecorder

pytestmark = pytest.mark.timeout(60)

DEADLINE_S = 20.0


def test_quantile_interpolates_inside_its_bucket_like_histogram_quantile() -> None:
    edges = (0.1, 0.2, 0.4)
    assert quantile(0.5, edges, (0, 10, 10), 10) == pytest.approx(0.15)
    assert quantile(0.5, edges, (4, 4, 8), 8) == pytest.approx(0.1)
    assert quantile(0.5, edges, (0, 0, 0), 4) == 0.4, "above every edge: the highest finite edge"
    assert quantile(0.5, edges, (0, 0, 0), 0) is None


def rank_status(rank: int, recorder: MetricsRecorder, alive: bool = True, **load: int) -> dict[str, Any]:
    return {"rank": rank, "alive": alive, "state": "running", "num_running": load.get("running", 0),
            "num_waiting": load.get("waiting", 0), "kv_used_tokens": 10, "kv_capacity_tokens": 40,
            "metrics": recorder.snapshot().as_map()}  # fmt: skip


def finish(recorder: MetricsRecorder, request_id: int, ttft_s: float, tokens: int) -> None:
    recorder.arrived(request_id, 0.0)
    recorder.scheduled(request_id, 4, 0, 0.0)
    for i in range(tokens):
        recorder.token(request_id, ttft_s + i * 0.01)
    recorder.finished_request(request_id, "length", ttft_s + tokens * 0.01)


def test_watch_rates_are_deltas_and_ttft_covers_the_window() -> None:
    r0, r1 = MetricsRecorder(), MetricsRecorder()
    finish(r0, 1, 5.0, 10)  # before the window: a slow first token that must not count
    watch = Watch(window_s=60)
    watch.add(0.0, {"ranks": [rank_status(0, r0), rank_status(1, r1)]})
    for i in range(4):
        finish(r0, 10 + i, 0.03, 25)
        finish(r1, 20 + i, 0.003, 50)
    watch.add(2.0, {"ranks": [rank_status(0, r0, running=2), rank_status(1, r1, alive=False)]})
    zero, one, total = watch.rows()
    assert (zero.label, zero.tokens_per_s, zero.running, zero.finished) == ("0", 50.0, 2, 5)
    assert zero.ttft is not None and zero.ttft.count == 4 and 0.02 < (zero.ttft.p50() or 0) <= 0.04
    assert (one.state, one.tokens_per_s, one.running) == ("dead", None, 0)
    assert total.label == "all" and total.tokens_per_s == 50.0 and total.finished == 9
    assert total.ttft is not None and total.ttft.count == 8
    for i in range(3):
        finish(r0, 90 + i, 0.5, 1)
    watch.add(100.0, {"ranks": [rank_status(0, r0)]})
    watch.add(101.0, {"ranks": [rank_status(0, r0)]})
    assert [at for at, _ in watch.samples] == [2.0, 100.0, 101.0], (
        "the baseline: the newest sample a window old"
    )
    late = watch.rows()[0]
    assert late.ttft is not None and late.ttft.count == 3 and late.ttft.p50() == pytest.approx(0.5, rel=0.5)


def test_a_restarted_rank_counts_from_zero_again() -> None:
    old, new = MetricsRecorder(), MetricsRecorder()
    for i in range(5):
        finish(old, i, 0.05, 10)
    finish(new, 1, 0.5, 4)
    watch = Watch()
    watch.add(0.0, {"ranks": [rank_status(0, old)]})
    watch.add(1.0, {"ranks": [rank_status(0, new)]})
    (row, _) = watch.rows()
    assert row.tokens_per_s == 4.0 and row.ttft is not None and row.ttft.count == 1


# ---------------------------------------------------------------------------- against a deployment


def run_cli(*args: str, columns: int = 80) -> str:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_status_table_fits_80_columns_with_whole_headers(deployment: Deployment) -> None:
    out = run_cli("status", "--address", deployment.address)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    header = next(line for line in lines if "rank" in line and "state" in line)
    assert "…" not in header and all(h in header for h in ("running", "waiting", "in flight")), header
    wide = run_cli("status", "--address", deployment.address, columns=200)
    assert "heartbeat s" in wide and "heartbeat s" not in out, "the widest terminal shows every column"


def test_top_once_prints_one_frame_that_fits_80_columns(deployment: Deployment) -> None:
    out = run_cli("top", "--once", "--address", deployment.address)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert "dpinfer top: running" in out and "TTFT p50" in out and "tokens/s" in out
    rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert rows == ["0", "1", "all"], out
    assert "q quits" not in out


def test_top_live_in_a_terminal_quits_on_q_and_restores_it(deployment: Deployment) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    before = termios.tcgetattr(slave)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpinfer", "top", "--address", deployment.address, "--interval", "0.2"],
        stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"}, close_fds=True,
    )  # fmt: skip
    try:
        screen = read_until(master, b"q quits", proc)
        assert b"TTFT p50" in screen and b"tokens/s" in screen
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0, "keys are read one at a time"
        os.write(master, b"q")
        assert proc.wait(timeout=DEADLINE_S) == 0
        after = termios.tcgetattr(slave)
        assert after[3] & (termios.ICANON | termios.ECHO) == before[3] & (termios.ICANON | termios.ECHO)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        os.close(master)
        os.close(slave)


def read_until(fd: int, marker: bytes, proc: subprocess.Popen[bytes]) -> bytes:
    got = b""
    deadline = time.monotonic() + DEADLINE_S
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {marker!r} on the screen: {got[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            got += os.read(fd, 65536)
    return got
