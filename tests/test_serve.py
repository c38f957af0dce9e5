"""`dpinfer serve --dp 2` as a user runs it: examples, pause with requests in flight, a killed
rank coming back (--max-restarts 1), and a clean stop that leaves no process or shm behind.

One deployment serves the whole module; the tests run in file order and the last one stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import alive, descendants, kill_tree

from dpinfer import AsyncInferenceClient, InferenceClient, SamplingParams
from dpinfer.config import new_deployment_id

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240


class Served:
    def __init__(self, tmp: Path) -> None:
        self.deployment_id = new_deployment_id()
        self.ready_file = tmp / "ready"
        self.log = tmp / "serve.log"
        cmd = [
            sys.executable, "-m", "dpinfer", "serve", "--model", "tiny-llama", "--dp", "2",
            "--port", "0", "--no-http", "--max-restarts", "1", "--threads-per-rank", "1",
            "--kv-cache-bytes", str(64 << 20), "--deployment-id", self.deployment_id,
            "--ready-file", str(self.ready_file), "--log-file", str(tmp / "ranks.log"),
        ]  # fmt: skip
        # Its own process group, so the stop test can press "Ctrl-C" the way a terminal does.
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.address = self._wait_ready()
        self.pids: set[int] = set()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready_file.exists() and self.ready_file.read_text().strip():
                return self.ready_file.read_text().strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)  # waiting on another process's file: poll with a deadline
        self.proc.kill()
        pytest.fail(f"dpinfer serve did not become ready:\n{self.log.read_text()[-3000:]}")

    def remember_processes(self) -> None:
        self.pids |= descendants(self.proc.pid) | {self.proc.pid}

    def leftovers(self) -> tuple[list[int], list[str]]:
        running = sorted(p for p in self.pids if alive(p))
        shm = sorted(n for n in os.listdir("/dev/shm") if self.deployment_id in n)
        sockets = sorted(n for n in os.listdir("/tmp") if n.startswith(f"dpinfer-{self.deployment_id}"))
        return running, shm + sockets

    def kill_all(self) -> None:
        kill_tree(self.proc, self.pids)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("serve"))
    s.remember_processes()
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.kill_all()


def _status(address: str) -> dict:
    with InferenceClient(address, timeout_s=10) as client:
        return client.status()


@pytest.mark.parametrize("example", ["quickstart.py", "streaming.py", "async_batch.py", "rl_pause_resume.py"])
def test_examples_run_against_the_deployment(served: Served, example: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), served.address],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{example} printed nothing"


def test_pause_with_requests_in_flight_completes_each_exactly_once_after_unpause(served: Served) -> None:
    before = _status(served.address)["totals"]

    async def scenario() -> None:
        async with AsyncInferenceClient(served.address, timeout_s=60) as client:
            params = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
            futures = [client.add_request(f"paused request {i}", params) for i in range(24)]
            await asyncio.sleep(0)  # let the batch go out before pausing
            await client.pause_engines()
            pending = {f for f in futures if not f.done()}
            assert pending, "every request finished before the pause: make them longer"
            done, _ = await asyncio.wait(pending, timeout=1.5, return_when=asyncio.FIRST_COMPLETED)
            assert not done, f"{len(done)} request(s) completed while paused"
            await client.unpause_engines()
            results = await asyncio.wait_for(asyncio.gather(*futures), timeout=120)
            assert all(r.ok and r.completion_tokens == 48 for r in results), results
            assert len({r.request_id for r in results}) == len(futures)

    asyncio.run(scenario())
    after = _status(served.address)["totals"]
    assert after["completed"] - before["completed"] == 24, (before, after)
    assert after["in_flight"] == 0


def test_a_stream_cut_off_by_a_killed_rank_ends_with_the_undisturbed_greedy_text(served: Served) -> None:
    # Mid-stream migration: the stream on the killed rank goes on on the other rank from its
    # prompt plus the tokens it streamed; the caller sees one uninterrupted result, logprobs too.
    params = SamplingParams(max_new_tokens=160, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = ["migrate me, first", "migrate me, second"]
    with InferenceClient(served.address, timeout_s=60) as client:
        reference = client.generate(prompts, params)
    ranks = {r["rank"]: r for r in _status(served.address)["ranks"]}
    victim = ranks[0]
    served.remember_processes()

    async def scenario() -> list[tuple[str, tuple[int, ...], Any]]:
        async with AsyncInferenceClient(served.address, timeout_s=60) as client:
            streams = [client.add_request_streaming(p, params) for p in prompts]  # one per rank
            texts: list[list[str]] = [[] for _ in streams]
            ids: list[list[int]] = [[] for _ in streams]
            started = [asyncio.Event() for _ in streams]
            results: list[Any] = [None, None]

            async def read(i: int) -> None:
                async for delta in streams[i]:
                    texts[i].append(delta.text)
                    ids[i].extend(delta.token_ids)
                    if len(ids[i]) >= 8:
                        started[i].set()
                    if delta.finished:
                        results[i] = delta.result

            readers = [asyncio.create_task(read(i)) for i in range(len(streams))]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*readers), timeout=60)
            return [("".join(t), tuple(i), r) for t, i, r in zip(texts, ids, results, strict=True)]

    outcomes = asyncio.run(scenario())
    for (text, token_ids, result), ref in zip(outcomes, reference, strict=True):
        assert result.ok, result
        assert result.token_ids == ref.token_ids and result.text == ref.text
        assert result.logprobs is not None and len(result.logprobs) == len(ref.token_ids)
        for got, want in zip(result.logprobs, ref.logprobs, strict=True):
            assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-3 for t in got)
        assert token_ids == ref.token_ids, "the streamed tokens: none lost, none repeated"
        assert text == ref.text, "the streamed text: no character lost or repeated"
    assert _status(served.address)["counters"]["migrated"] >= 1
    _wait_rank_back(served, 0, victim["pid"])


def _wait_rank_back(served: Served, rank: int, old_pid: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        back = {r["rank"]: r for r in _status(served.address)["ranks"]}.get(rank)
        if back and back["alive"] and back["pid"] != old_pid:
            served.remember_processes()
            return
        assert time.monotonic() < deadline, f"rank {rank} did not come back: {back}"
        time.sleep(0.5)  # the replacement loads a model: poll status with a deadline


def test_killed_rank_other_keeps_serving_and_rank_comes_back(served: Served) -> None:
    status = _status(served.address)
    victim = next(r for r in status["ranks"] if r["rank"] == 1)
    served.remember_processes()

    async def scenario() -> list:
        async with AsyncInferenceClient(served.address, timeout_s=60) as client:
            params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
            futures = [client.add_request(f"kill test {i}", params) for i in range(16)]
            await asyncio.sleep(0.3)
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=30)

    results = asyncio.run(scenario())
    for r in results:
        assert r.ok or (r.finish_reason == "error" and r.error), r
    assert any(r.ok and r.rank == 0 for r in results)
    with InferenceClient(served.address, timeout_s=30) as client:
        assert all(r.ok for r in client.generate(["still serving"] * 4, SamplingParams(max_new_tokens=4)))

    _wait_rank_back(served, 1, victim["pid"])
    with InferenceClient(served.address, timeout_s=30) as client:
        result = client.generate("pinned to the restarted rank", SamplingParams(max_new_tokens=4), rank=1)[0]
    assert result.ok and result.rank == 1, result


def test_sigint_stops_everything_and_leaves_nothing_behind(served: Served) -> None:
    served.remember_processes()
    os.killpg(served.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    assert served.proc.wait(timeout=90) == 0, served.log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while (left := served.leftovers()) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)  # the last children are being reaped
    assert left == ([], []), f"left behind: processes {left[0]}, files {left[1]}"
