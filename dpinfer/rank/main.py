"""Engine rank entry point: ``run_rank(config)``, called by the torchrun worker (``dpinfer.launcher.worker``).

Four beats: build (bind the outputs socket, spawn the tokenizer, scheduler and detokenizer
with the spawn start method) -> report ready (wait for every child's ready message with
``--ready-timeout-s``, then register with the coordinator, never before) -> loop
(``RankMain``) -> clean shutdown (``Shutdown`` to every child, join, close, exit code).

``run_rank`` never imports torch or transformers; the children do. Children's pids are
logged at INFO and show up under this process in ``/proc`` with the names
``dpinfer-tok``, ``dpinfer-sched`` and ``dpinfer-detok``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import zmq

from dpinfer.config import LocalSocket, RankConfig, ipc_address
from dpinfer.log import get_logger, set_role
from dpinfer.protocol import local as m
from dpinfer.rank.children import CHILDREN, SCHEDULER, TOKENIZER
from dpinfer.rank.supervisor import ChildStartError, Supervisor
from dpinfer.transport.shm import cleanup_stale_segments

logger = get_logger(__name__)

CHILD_EXIT_TIMEOUT_S = 10.0
CREDIT_PER_RUNNING_SLOT = 4
"""A rank takes at most this many requests per decoding slot (``max_running_requests``): enough
waiting to keep its batches full, while the rest wait in the coordinator's bounded queue."""


def max_prompt_len(infos: dict[str, dict[str, int]]) -> int:
    """The longest prompt the rank accepts: room for at least one generated token."""
    sched = infos[SCHEDULER.name]
    limit = int(sched["max_context_len"]) - 1
    capacity = int(sched.get("kv_capacity_tokens", 0))
    if capacity > 0:
        limit = min(limit, capacity - 1)
    return max(1, limit)


def run_rank(config: RankConfig) -> int:
    """Run one engine rank until STOP; return 0. A failure raises ``SystemExit(1)``.

    Failures: a child that does not start (its error is logged, e.g. an unknown model), no
    coordinator within ``connect_timeout_s``, or a child that dies while serving.
    """
    from dpinfer.rank.connection import EngineConnection, registration
    from dpinfer.rank.loop import RankMain

    set_role("rank", config.rank)
    dep, rank = config.deployment_id, config.rank
    context = zmq.Context()
    sockets = {
        "recv_outputs": _socket(context, zmq.PULL, bind=ipc_address(dep, rank, LocalSocket.RANK_OUTPUTS))
    }
    for spec in CHILDREN:
        sockets[f"send_to_{spec.name}"] = _socket(
            context, zmq.PUSH, connect=ipc_address(dep, rank, spec.input)
        )
    supervisor = Supervisor(config)
    conn = None
    code = 1
    try:
        supervisor.start(CHILDREN, _child_kwargs(config))
        infos = supervisor.wait_ready(config.ready_timeout_s)
        pids = ", ".join(f"{name} pid={pid}" for name, pid in supervisor.pids().items())
        logger.info("children ready: %s", pids)
        limit = max_prompt_len(infos)
        sockets["send_to_tokenizer"].send_pyobj(m.SetLimits(limit))
        info = registration(
            rank,
            config.model.device,
            config.model.model,
            limit,
            int(infos[SCHEDULER.name]["kv_capacity_tokens"]),
            max_in_flight=CREDIT_PER_RUNNING_SLOT * config.scheduler.max_running_requests,
        )
        conn = EngineConnection(config.coordinator, info, curve_dir=config.curve_dir, context=context)
        ack = conn.connect_and_register(config.connect_timeout_s)
        main = RankMain(rank, conn, supervisor, sockets)
        main.apply_state(ack.state)
        logger.info("rank %d serving %s on %s (state %s; %s)", rank, config.model.model, config.model.device,
                    ack.state, pids)  # fmt: skip
        code = main.run()
    except ChildStartError as e:
        logger.error("rank %d cannot start: %s", rank, e)
    except ConnectionError as e:
        logger.error("rank %d: %s", rank, e)
    except KeyboardInterrupt:
        logger.warning("rank %d interrupted while starting", rank)
        code = 130
    finally:
        _shutdown(supervisor, sockets)
        if conn is not None:
            conn.close()
        for sock in sockets.values():
            sock.close(linger=0)
        context.term()
        remove_ipc_files(dep, rank)
        # A child killed outright cannot unlink what it owned (the shm region of its channel):
        # whoever started this rank, nothing of a dead child's stays behind.
        cleanup_stale_segments(dep)
    if code != 0:
        raise SystemExit(code)
    logger.info("rank %d exited cleanly", rank)
    return 0


def _child_kwargs(config: RankConfig) -> dict[str, dict[str, Any]]:
    """Objects both channel ends need from the parent (only the ``tensor_queue`` transport has one)."""
    if config.transport.transport != "tensor_queue":
        return {}
    from dpinfer.transport.channel import make_tensor_queue

    queue = make_tensor_queue(config.transport)
    return {TOKENIZER.name: {"tensor_queue": queue}, SCHEDULER.name: {"tensor_queue": queue}}


def remove_ipc_files(deployment_id: str, rank: int) -> None:
    """Unlink this rank's ipc socket files (libzmq leaves them behind after close)."""
    for name in LocalSocket:
        with contextlib.suppress(OSError):
            os.unlink(ipc_address(deployment_id, rank, name).removeprefix("ipc://"))


def _socket(
    context: zmq.Context, kind: int, bind: str | None = None, connect: str | None = None
) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 1000)
    if kind == zmq.PUSH:
        # Never block the rank main's loop (heartbeats) on a slow child; the coordinator
        # bounds what is in flight, and a dead child ends the rank anyway.
        sock.setsockopt(zmq.SNDHWM, 0)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


def _shutdown(supervisor: Supervisor, sockets: dict[str, zmq.Socket]) -> None:
    for name, child in supervisor.children.items():
        if child.process.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                sockets[f"send_to_{name}"].send_pyobj(m.Shutdown("rank exiting"), zmq.NOBLOCK)
    supervisor.stop(CHILD_EXIT_TIMEOUT_S)
