"""Small Linux process helpers shared by every process that spawns children."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

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
