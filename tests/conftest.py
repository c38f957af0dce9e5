"""Shared pytest fixtures: coordinators and null ranks that are always cleaned up.

``coordinator_factory(**config)`` starts a coordinator process (``CoordinatorConfig`` fields;
``port=0`` by default) and ``null_ranks(address, ranks, **kwargs)`` starts null-engine rank
processes; both are ended (SHUTDOWN, then kill) when the test finishes. For module-wide
deployments use ``wire.Deployment`` directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

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
