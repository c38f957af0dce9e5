"""Shared pytest fixtures: coordinators and null ranks that are always cleaned up.

``coordinator_factory(**config)`` starts a coordinator process (``CoordinatorConfig`` fields;
``port=0`` by default) and ``null_ranks(address, ranks, **kwargs)`` starts null-engine rank
processes; both are ended (SHUTDOWN, then kill) when the test finishes. For module-wide
deployments use ``wire.Deployment`` directly.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import procs
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from wire import Deployment, end_processes

from dpinfer.config import CoordinatorConfig
from dpinfer.coordinator.process import CoordinatorHandle, start_coordinator
from dpinfer.testing.null_rank import start_null_engines

# Short liveness timings keep fault tests fast; tests that need others pass their own.
FAST_TIMINGS = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 0.6, "control_timeout_s": 5.0}


@pytest.fixture
def coordinator_factory() -> Iterator[Callable[..., CoordinatorHandle]]:
    handles: list[CoordinatorHandle] = []

    def start(**overrides: Any) -> CoordinatorHandle:
        handle = start_coordinator(CoordinatorConfig(**{"port": 0, **FAST_TIMINGS, **overrides}))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop(timeout_s=5)


@pytest.fixture
def null_ranks() -> Iterator[Callable[..., list[Any]]]:
    procs: list[Any] = []

    def start(address: str, ranks: list[int], **kwargs: Any) -> list[Any]:
        started = start_null_engines(address, ranks, **kwargs)
        procs.extend(started)
        return started

    yield start
    end_processes(procs)


@pytest.fixture
def deployment_factory() -> Iterator[Callable[..., Deployment]]:
    deployments: list[Deployment] = []

    def start(ranks: list[int], rank_kwargs: dict[str, Any] | None = None, **config: Any) -> Deployment:
        dep = Deployment.start(ranks, rank_kwargs or {}, **{**FAST_TIMINGS, **config})
        deployments.append(dep)
        return dep

    yield start
    for dep in deployments:
        dep.close()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """A coordinator with two live null ranks, shared by one test module."""
    d = Deployment.start([0, 1], {})
    yield d
    d.close()


# ---------------------------------------------------------------------------- dpinfer serve


class ServeProcess:
    """``python -m dpinfer serve ARGS`` in its own process group, as a user runs it.

    Ready when its ready file names the coordinator (line 1) and the HTTP front (line 2, if
    any); ``kill_all()`` ends it and every process it started.
    """

    def __init__(self, tmp: Any, args: list[str], timeout_s: float = 240.0) -> None:
        import subprocess
        import time

        from dpinfer.config import new_deployment_id

        self.deployment_id = new_deployment_id()
        self.ready_file = tmp / "ready"
        self.log = tmp / "serve.log"
        cmd = [
            sys.executable, "-m", "dpinfer", "serve", "--port", "0", "--threads-per-rank", "1",
            "--kv-cache-bytes", str(64 << 20), "--deployment-id", self.deployment_id,
            "--ready-file", str(self.ready_file), "--log-file", str(tmp / "ranks.log"), *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:  # whatever goes wrong before the fixture owns it, the deployment must not outlive the test
            deadline = time.monotonic() + timeout_s
            while not (self.ready_file.exists() and self.ready_file.read_text().endswith("\n")):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dpinfer serve did not become ready:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.2)  # another process's file: poll with a deadline
            lines = self.ready_file.read_text().split()
            self.address = lines[0]
            self.http_url = lines[1] if len(lines) > 1 else ""
            self.pids = self.descendants()
        except BaseException:
            self.kill_all()
            raise

    def descendants(self) -> set[int]:
        return procs.descendants(self.proc.pid) | {self.proc.pid}

    def alive(self) -> list[int]:
        return sorted(p for p in self.pids if procs.alive(p))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop as a user would (SIGINT: drain, then every process and file goes); kill what is left."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or self.alive():
            self.kill_all()
        for leftover in Path(tempfile.gettempdir()).glob(f"dpinfer-{self.deployment_id}-*"):
            leftover.unlink(missing_ok=True)  # ipc files of processes that had to be killed

    def kill_all(self) -> None:
        procs.kill_tree(self.proc, getattr(self, "pids", set()))


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[list[str]], ServeProcess]]:
    """``serve_process(args)`` starts a ``dpinfer serve`` for this module; all are killed at its end."""
    started: list[ServeProcess] = []

    def start(args: list[str]) -> ServeProcess:
        served = ServeProcess(tmp_path_factory.mktemp("serve"), args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


# ---------------------------------------------------------------------------- a byte tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    """ByT5's tokenizer (one token per UTF-8 byte, no download): the detokenizer tests' model."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def decode(tok: Any) -> Callable[[Sequence[int]], str]:
    def fn(ids: Sequence[int]) -> str:
        text: str = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    return fn


def ids_of(tok: Any, text: str) -> list[int]:
    ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
    return ids
