"""The ``mixed`` workload through one real rank stack, for ``dpinfer bench engine``.

A coordinator and one rank process (TokenizerProcess -> SchedulerProcess -> Detokenizer-
Process, the same code ``dpinfer serve`` runs) on this machine; the requests go through the
async client with streaming on, every one submitted at t=0, and each streamed token is
timestamped when its delta arrives. Compared with the in-process Scheduler on the same
workload, the difference is what the rank's processes, sockets and detokenization cost.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import click

from dpinfer.bench.coordinator import wait_for_ranks
from dpinfer.bench.report import process_cpu_s
from dpinfer.bench.workloads import Case, EngineSetup, Workload, summarize
from dpinfer.errors import RequestTimeoutError

RANK_START_TIMEOUT_S = 300.0


def _start_rank(address: str, setup: EngineSetup) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(setup.threads))
    cmd = [
        sys.executable, "-m", "dpinfer.launcher.worker", "--no-supervise",
        "--threads-per-rank", str(setup.threads), "--coordinator", address, "--rank", "0",
        "--model", setup.model, "--device", setup.device, "--dtype", setup.dtype,
        "--max-running-requests", str(setup.max_running_requests),
        "--max-prefill-tokens", str(setup.step_tokens),
        "--mixed-steps" if setup.mixed_steps else "--no-mixed-steps",
        "--kv-cache-bytes", str(setup.kv_cache_bytes or 512 << 20), "--kv-prefault",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _drive(
    address: str, prompts: list[list[int]], output_lens: list[int]
) -> tuple[list[list[float]], float, float]:
    """Per-request token timestamps, and the start and end of the timed run (after a warm-up)."""
    from dpinfer import AsyncInferenceClient, SamplingParams

    stamps: list[list[float]] = [[] for _ in prompts]

    async def one(client: AsyncInferenceClient, i: int) -> None:
        params = SamplingParams(max_new_tokens=output_lens[i], temperature=0.0, ignore_eos=True)
        async for delta in client.add_request_streaming(prompts[i], params):
            if delta.token_ids:
                stamps[i].extend([time.perf_counter()] * len(delta.token_ids))
            if delta.finished and (delta.result is None or not delta.result.ok):
                error = delta.result.error if delta.result else "no result"
                raise click.ClickException(f"request {i} failed in the rank stack: {error}")

    async with AsyncInferenceClient(address, timeout_s=600.0) as client:
        await asyncio.gather(*(one(client, i) for i in range(min(2, len(prompts)))))  # warm-up
        stamps[:] = [[] for _ in prompts]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
        end = time.perf_counter()
    return stamps, t0, end


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the rank main and its three processes)."""
    total = process_cpu_s(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                total += process_cpu_s(int(entry))
        except (OSError, ValueError):
            continue
    return total


def run_rank_stack(setup: EngineSetup, workload: Workload) -> Case:
    """One ``cases`` entry (system ``dpinfer_rank``) for ``workload`` through a real rank."""
    from dpinfer.config import CoordinatorConfig
    from dpinfer.coordinator.process import start_coordinator

    coordinator = start_coordinator(CoordinatorConfig(port=0))
    rank = _start_rank(coordinator.address, setup)
    try:
        try:
            wait_for_ranks(coordinator.address, 1, RANK_START_TIMEOUT_S, process=rank)
        except RequestTimeoutError as e:
            raise click.ClickException(f"the benchmark rank did not start: {e}") from None
        cpu0 = _tree_cpu_s(rank.pid)
        stamps, t0, end = asyncio.run(_drive(coordinator.address, workload.prompts, workload.output_lens))
        return summarize(workload, "dpinfer_rank", t0, stamps, end, _tree_cpu_s(rank.pid) - cpu0)
    finally:
        rank.terminate()
        try:
            rank.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()
        coordinator.stop()
