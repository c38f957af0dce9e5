"""The torchrun worker: one per data-parallel rank, a supervisor around the rank stack.

``torchrun --nproc_per_node=N -m dpinfer.launcher.worker --coordinator ADDR --model M`` (or
``launch/engine.py``, which calls ``main``). Each worker:

1. reads ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and picks ``cuda:LOCAL_RANK`` when CUDA is
   there, else ``cpu`` (``--device`` overrides); on CPU it sets the thread count per rank;
2. joins a process group (gloo on CPU, nccl on GPU) for one start-up barrier, then leaves it:
   ranks never talk to each other after start-up, so none depends on another;
3. runs the rank stack (``dpinfer.rank.main.run_rank``) in a child process and supervises it
   (``--no-supervise`` runs it in this process instead and exits with its code: for tests
   and for launchers that restart ranks themselves).

This is the only entry point of a rank; ``dpinfer serve``, ``launch/engine.py`` and the tests
all start ranks through it.

Why a supervisor: torchrun tears down the whole worker group when one worker fails. Here the
worker itself never fails because its rank did: it restarts the rank up to ``--max-restarts``
times (the new rank re-registers with the coordinator under the same rank id), and when the
restarts are spent it logs why and exits 0, so the other ranks keep serving.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import time
from datetime import timedelta
from types import FrameType
from typing import Unpack

import click

from dpinfer.config import ConfigError, RankConfig, default_address
from dpinfer.launcher.options import EngineOptions, engine_options, rank_config_from_options
from dpinfer.log import get_logger, set_role
from dpinfer.procutil import die_with_parent
from dpinfer.rank.loop import EXIT_DISPLACED

logger = get_logger(__name__)

STOP_GRACE_S = 30.0


@dataclasses.dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_environ(cls) -> TorchrunEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


def pick_device(requested: str | None, local_rank: int) -> str:
    if requested and requested != "auto":
        return requested
    import torch

    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def threads_per_rank(requested: int, local_world_size: int) -> int:
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def startup_barrier(env: TorchrunEnv, device: str, timeout_s: float) -> None:
    """Meet every other rank once, then drop the group so no rank depends on another."""
    if env.world_size <= 1 or "MASTER_ADDR" not in os.environ:
        return
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    device_id = int(device.split(":")[1]) if backend == "nccl" and ":" in device else None
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_rank_child(config: RankConfig) -> None:
    die_with_parent(signal.SIGTERM)  # torchrun tearing the worker down must not orphan the rank
    _run_rank(config)


def _run_rank(config: RankConfig) -> int:
    if config.num_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(config.num_threads)  # inherited by the rank's children
    from dpinfer.rank.main import run_rank

    return run_rank(config)


class RankSupervisor:
    """Runs one rank stack in a child process and restarts it when it dies unexpectedly."""

    def __init__(self, config: RankConfig, max_restarts: int) -> None:
        self.config = config
        self.max_restarts = max_restarts
        self._ctx = mp.get_context("spawn")
        self._child: mp.process.BaseProcess | None = None
        self._stopping = False

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        if self._child is not None and self._child.pid and self._child.is_alive():
            os.kill(self._child.pid, signum)

    def run(self) -> int:
        restarts = 0
        while True:
            self._child = self._ctx.Process(
                target=_run_rank_child, args=(self.config,), name=f"rank{self.config.rank}"
            )
            self._child.start()
            logger.info("rank %d started (pid %d)", self.config.rank, self._child.pid)
            self._child.join()
            code = self._child.exitcode
            if code == 0 or self._stopping:
                logger.info("rank %d exited (code %s)", self.config.rank, code)
                return 0
            if code == EXIT_DISPLACED:
                logger.error(
                    "rank %d was taken over by a newer registration; not restarting it", self.config.rank
                )
                return 0
            if restarts >= self.max_restarts:
                logger.error(
                    "rank %d died (exit code %s), %d restart(s) spent; the other ranks keep serving",
                    self.config.rank,
                    code,
                    self.max_restarts,
                )
                return 0
            restarts += 1
            logger.warning(
                "rank %d died (exit code %s); restart %d of %d",
                self.config.rank,
                code,
                restarts,
                self.max_restarts,
            )
            time.sleep(min(0.2 * restarts, 2.0))  # back off a crash loop a little


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--coordinator", default=default_address, help="Address of the coordinator to register with.")
@engine_options
@click.option("--max-restarts", default=0, show_default=True, help="Restart a dead rank this many times.")
@click.option(
    "--threads-per-rank", default=0, help="torch threads per rank on CPU (0: cores / ranks on this node)."
)
@click.option("--barrier-timeout-s", default=300.0, show_default=True, help="Start-up barrier timeout.")
@click.option(
    "--rank", type=int, default=None, help="Data-parallel rank id (default: $RANK from torchrun, or 0)."
)
@click.option(
    "--supervise/--no-supervise",
    default=True,
    show_default=True,
    help="Run the rank in a child process and restart it when it dies; --no-supervise runs it here "
    "and exits with its code.",
)
def main(
    coordinator: str,
    max_restarts: int,
    threads_per_rank: int,
    barrier_timeout_s: float,
    rank: int | None,
    supervise: bool,
    **options: Unpack[EngineOptions],
) -> None:
    """torchrun entry point: run and supervise the engine rank of this worker."""
    # torchrun runs each worker in a session of its own: if torchrun is killed, nothing else
    # would end this worker and its rank (they would keep serving, orphaned).
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:
        sys.exit("the process that started this worker is gone")
    env = TorchrunEnv.from_environ()
    rank_id = env.rank if rank is None else rank
    set_role("worker", rank_id)
    device = options["device"] = pick_device(options["device"], env.local_rank)
    num_threads = threads_per_rank_from(threads_per_rank, env, device)
    try:
        config = rank_config_from_options(coordinator, rank=rank_id, num_threads=num_threads, **options)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    startup_barrier(env, device, barrier_timeout_s)
    if not supervise:
        sys.exit(_run_rank(config))
    supervisor = RankSupervisor(config, max_restarts)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    sys.exit(supervisor.run())


def threads_per_rank_from(requested: int, env: TorchrunEnv, device: str) -> int:
    if device.startswith("cuda") and requested <= 0:
        return 1
    return threads_per_rank(requested, env.local_world_size)


if __name__ == "__main__":
    main()
