"""Engine rank entry point: ``run_rank(config)`` and ``python -m dpinfer.engine.rank``.

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
import sys
from typing import Any

import click
import zmq

from dpinfer.config import RankConfig, default_address, ipc_address
from dpinfer.engine import messages as m
from dpinfer.engine.supervisor import ChildStartError, Supervisor
from dpinfer.log import get_logger, set_level, set_role

logger = get_logger("dpinfer.engine.rank")

CHILD_TARGETS = {
    m.TOKENIZER: "dpinfer.engine.tokenizer_process:run_tokenizer_process",
    m.SCHEDULER: "dpinfer.scheduler.process:run_scheduler_process",
    m.DETOKENIZER: "dpinfer.engine.detokenizer_process:run_detokenizer_process",
}
CHILD_INPUT_SOCKET = {
    m.TOKENIZER: "send_to_tokenizer",
    m.SCHEDULER: "send_to_scheduler",
    m.DETOKENIZER: "send_to_detokenizer",
}
CHILD_EXIT_TIMEOUT_S = 10.0


def max_prompt_len(infos: dict[str, dict[str, int]]) -> int:
    """The longest prompt the rank accepts: room for at least one generated token."""
    sched = infos[m.SCHEDULER]
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
    from dpinfer.engine.connection import EngineConnection, RankInfo
    from dpinfer.engine.rank_main import RankMain

    set_role("rank", config.rank)
    dep, rank = config.deployment_id, config.rank
    context = zmq.Context()
    sockets = {
        "recv_outputs": _socket(context, zmq.PULL, bind=ipc_address(dep, rank, m.ADDR_RANK_OUTPUTS)),
        "send_to_tokenizer": _socket(context, zmq.PUSH, connect=ipc_address(dep, rank, m.ADDR_TOKENIZER_IN)),
        "send_to_scheduler": _socket(
            context, zmq.PUSH, connect=ipc_address(dep, rank, m.ADDR_SCHEDULER_CONTROL)
        ),
        "send_to_detokenizer": _socket(
            context, zmq.PUSH, connect=ipc_address(dep, rank, m.ADDR_DETOKENIZER_IN)
        ),
    }
    supervisor = Supervisor(config)
    conn = None
    code = 1
    try:
        supervisor.start(CHILD_TARGETS, _child_kwargs(config))
        infos = supervisor.wait_ready(config.ready_timeout_s)
        pids = ", ".join(f"{name} pid={pid}" for name, pid in supervisor.pids().items())
        logger.info("children ready: %s", pids)
        limit = max_prompt_len(infos)
        sockets["send_to_tokenizer"].send_pyobj(m.SetLimits(limit))
        info = RankInfo.local(
            rank,
            config.model.device,
            config.model.model,
            limit,
            int(infos[m.SCHEDULER]["kv_capacity_tokens"]),
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
    return {m.TOKENIZER: {"tensor_queue": queue}, m.SCHEDULER: {"tensor_queue": queue}}


def remove_ipc_files(deployment_id: str, rank: int) -> None:
    """Unlink this rank's ipc socket files (libzmq leaves them behind after close)."""
    for name in m.ALL_ADDRS:
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
                sockets[CHILD_INPUT_SOCKET[name]].send_pyobj(m.Shutdown("rank exiting"), zmq.NOBLOCK)
    supervisor.stop(CHILD_EXIT_TIMEOUT_S)


def _build_cli() -> click.Command:
    from dpinfer.launcher.options import engine_options

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--coordinator", default=default_address, show_default="$DPINFER_ADDRESS or tcp://127.0.0.1:5555",
                  help="Address of the coordinator to register with.")  # fmt: skip
    @click.option("--rank", type=int, default=None, help="Data-parallel rank id (default: $RANK or 0).")
    @click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default) or ERROR.")
    @engine_options
    def main(coordinator: str, rank: int | None, log_level: str | None, **options: object) -> None:
        """Run one engine rank: register with the coordinator and serve until STOP."""
        from dpinfer.config import ConfigError
        from dpinfer.launcher.options import rank_config_from_options

        if log_level:
            set_level(log_level)
        rank_id = rank if rank is not None else int(os.environ.get("RANK", "0"))
        device = options.pop("device")
        if device == "auto":
            device = _auto_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            config = rank_config_from_options(coordinator=coordinator, rank=rank_id, device=device, **options)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        sys.exit(run_rank(config))

    return main


def _auto_device(local_rank: int) -> str:
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    _build_cli()(prog_name="python -m dpinfer.engine.rank")
