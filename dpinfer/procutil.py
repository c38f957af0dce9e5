"""Small Linux process helpers shared by every process that spawns children."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import signal
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, arg: int | bytes) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (no orphans)."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_process_name(name: str) -> None:
    """Name this process in ``/proc/<pid>/comm`` (15 characters at most), for ps and tests."""
    _prctl(_PR_SET_NAME, name[:15].encode())


def spawn_reporting_address(
    target: Callable[..., None], args: tuple[object, ...], what: str, timeout_s: float = 30.0
) -> tuple[BaseProcess, str]:
    """Spawn ``target(*args, conn)`` as a daemon process and wait for the address it sends.

    ``target`` must send one string (the address it bound) on ``conn`` once it serves.
    Returns ``(process, address)``; a child that reports nothing in ``timeout_s`` is killed.
    """
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout_s):
            proc.kill()
            proc.join(5)
            raise RuntimeError(f"{what} did not start within {timeout_s:g} s")
        return proc, parent_conn.recv()
    finally:
        parent_conn.close()
