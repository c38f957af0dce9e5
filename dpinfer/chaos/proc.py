"""What ``/proc`` says about the processes a chaos run started (Linux; psutil is not a dependency)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first, then ppid)."""
    return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def children_map() -> dict[int, list[int]]:
    """ppid -> pids of every process now running."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry.name)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> set[int]:
    """Every process below ``pid`` now (torchrun starts each worker in a session of its own)."""
    children = children_map() if children is None else children
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def comm(pid: int) -> str:
    """The process name (``/proc/PID/comm``), "" when it is gone."""
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS``), 0 when it is gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def send(pids: Iterable[int], sig: signal.Signals) -> list[int]:
    """Send ``sig`` to each live pid; the ones it reached."""
    reached = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            reached.append(pid)
    return reached
