"""Process helpers for tests that start whole process trees (from /proc; psutil is not a dependency)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable

from dpinfer.chaos.proc import alive, descendants

__all__ = ["alive", "descendants", "kill_tree"]


def kill_tree(proc: subprocess.Popen[bytes], known: Iterable[int] = ()) -> None:
    """SIGKILL ``proc``, every process below it now, and ``known`` (ones seen earlier that may
    have been re-parented since), then reap ``proc``."""
    for pid in set(known) | descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
