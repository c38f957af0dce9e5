"""Spawn a rank's child processes, wait for their ready messages, notice deaths, stop them.

Contract of a child target (named ``"module:function"`` so the rank main never imports
torch itself): ``target(config, report_ready, **kwargs)`` builds everything, calls
``report_ready(info)`` exactly once when it serves (``info``: a small picklable dict), runs
its loop and returns on shutdown. An exception before ``report_ready`` becomes a
``ChildFailed`` carrying the error text, so the rank main reports why (e.g. "unknown model")
instead of hanging. Children use the spawn start method, name themselves in
``/proc/<pid>/comm`` (``dpinfer-tok``, ``dpinfer-sched``, ``dpinfer-detok``) and receive
SIGTERM if the rank main dies (Linux ``PR_SET_PDEATHSIG``), so none is left behind.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from dpinfer.config import RankConfig
from dpinfer.errors import DpinferError
from dpinfer.log import get_logger, set_role
from dpinfer.procutil import die_with_parent, set_process_name
from dpinfer.protocol.local import ChildFailed, ChildReady
from dpinfer.rank.children import ChildSpec

logger = get_logger(__name__)

ReportReady = Callable[[dict[str, Any]], None]
ChildTarget = Callable[..., None]


def resolve_target(path: str) -> ChildTarget:
    """``"package.module:function"`` -> the function."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class ChildStartError(DpinferError):
    """A child process failed to start or was not ready in time; the message says which and why."""


@dataclass
class Child:
    spec: ChildSpec
    process: BaseProcess
    conn: Connection
    info: dict[str, Any] = field(default_factory=dict)
    ready: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.process.pid or -1


EXIT_GRACE_S = 5


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _arm_exit_watchdog() -> None:
    """Make SIGTERM end this process within ``EXIT_GRACE_S``, even if the orderly exit stalls.

    The orderly path is ``_raise_exit`` unwinding through ``finally`` blocks. Seen here: about
    one child in three whose rank main was SIGKILLed (so it got SIGTERM from PR_SET_PDEATHSIG)
    stayed blocked in a ZMQ call forever -- pyzmq retries a call interrupted by EINTR, and the
    handler's SystemExit did not surface. The C-level handler always writes to the wakeup fd,
    so this watchdog thread sees every SIGTERM and arms SIGALRM, whose default action ends
    the process if the orderly exit has not finished by then.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def watch() -> None:
        os.read(read_fd, 1)
        signal.alarm(EXIT_GRACE_S)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()


def child_main(
    spec: ChildSpec,
    config: RankConfig,
    conn: Connection,
    parent_pid: int,
    kwargs: dict[str, Any] | None = None,
) -> None:
    """Entry point of every child (module level, so the spawn start method can pickle it)."""
    name = spec.name
    set_role(name, config.rank)
    set_process_name(spec.comm_name)
    die_with_parent(signal.SIGTERM)
    # SIGTERM unwinds through ``finally`` blocks (sockets closed, shared memory unlinked).
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the rank main, which stops us
    _arm_exit_watchdog()
    if os.getppid() != parent_pid:
        return  # the rank main died before we could ask to follow it
    reported = False

    def report_ready(info: dict[str, Any]) -> None:
        nonlocal reported
        reported = True
        conn.send(ChildReady(name, os.getpid(), info))

    try:
        resolve_target(spec.target)(config, report_ready, **(kwargs or {}))
    except SystemExit:
        raise
    except BaseException as e:
        error = str(e) if isinstance(e, DpinferError) else f"{type(e).__name__}: {e}"
        if not reported:
            with contextlib.suppress(OSError):
                conn.send(ChildFailed(name, os.getpid(), error))
            logger.error("failed to start: %s", error, exc_info=not isinstance(e, DpinferError))
        else:
            logger.exception("crashed")
        sys.exit(1)
    finally:
        conn.close()


class Supervisor:
    """Owns the child processes of one rank main."""

    def __init__(self, config: RankConfig) -> None:
        self.config = config
        self.children: dict[str, Child] = {}
        self._ctx = mp.get_context("spawn")
        self._stopped = False
        self._kwargs: dict[str, dict[str, Any]] = {}

    def start(self, specs: Sequence[ChildSpec], kwargs: dict[str, dict[str, Any]] | None = None) -> None:
        """Spawn one child per spec (they start in parallel).

        ``kwargs[name]`` are extra keyword arguments of that child's target (picklable objects
        that must be created in the parent, e.g. a ``torch.multiprocessing`` queue).
        """
        # Keep them referenced: a queue's semaphores are unlinked when the parent's copy is
        # collected, and the children unpickle them only once they have booted.
        self._kwargs = kwargs or {}
        for spec in specs:
            name = spec.name
            reader, writer = self._ctx.Pipe(duplex=False)
            process = self._ctx.Process(
                target=child_main,
                args=(spec, self.config, writer, os.getpid(), (kwargs or {}).get(name)),
                name=f"dpinfer-r{self.config.rank}-{name}",
                daemon=True,
            )
            process.start()
            writer.close()  # the child holds the only writer: EOF here means it died
            self.children[name] = Child(spec, process, reader)

    def wait_ready(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Block until every child reported ready; ``ChildStartError`` on failure or timeout."""
        deadline = time.monotonic() + timeout_s
        pending = {c.conn: c for c in self.children.values() if not c.ready}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(sorted(c.name for c in pending.values()))
                raise ChildStartError(f"{names} not ready within {timeout_s:g} s (--ready-timeout-s)")
            for conn in wait(list(pending), timeout=remaining):
                child = pending.pop(conn)  # type: ignore[call-overload]
                self._on_start_message(child)
        return {c.name: c.info for c in self.children.values()}

    def _on_start_message(self, child: Child) -> None:
        try:
            msg = child.conn.recv()
        except (EOFError, OSError):
            child.process.join(timeout=5.0)
            raise ChildStartError(
                f"{child.name} process (pid {child.pid}) exited with code {child.process.exitcode} "
                "before it was ready"
            ) from None
        if isinstance(msg, ChildFailed):
            raise ChildStartError(f"{child.name} process failed to start: {msg.error}")
        assert isinstance(msg, ChildReady), f"unexpected start message {msg!r}"
        child.info, child.ready = msg.info, True
        logger.info("%s ready (pid %d)", child.name, msg.pid)

    def sentinels(self) -> dict[int, Child]:
        """File descriptors that become readable when a child exits (for a ``zmq.Poller``)."""
        return {c.process.sentinel: c for c in self.children.values()}

    def pids(self) -> dict[str, int]:
        return {name: c.pid for name, c in self.children.items()}

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for every child to exit (after a ``Shutdown``); terminate, then kill stragglers.

        Idempotent; afterwards the process objects are closed.
        """
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            child.process.join(timeout=max(0.0, deadline - time.monotonic()))
            logger.debug(
                "%s exited (code %s) after %.2f s",
                child.name,
                child.process.exitcode,
                timeout_s - (deadline - time.monotonic()),
            )
        for sig_name, grace_s in (("terminate", 3.0), ("kill", 3.0)):
            alive = [c for c in self.children.values() if c.process.is_alive()]
            if not alive:
                break
            for c in alive:
                logger.warning("%s (pid %d) did not exit; sending %s", c.name, c.pid, sig_name)
                getattr(c.process, sig_name)()
            for c in alive:
                c.process.join(timeout=grace_s)
        for child in self.children.values():
            child.conn.close()
            with contextlib.suppress(ValueError):
                child.process.close()
