"""The one logger factory: every line carries role, rank and pid.

Use ``get_logger(__name__)`` at module level and call ``set_role("scheduler", rank=0)``
once at the start of each process's entry function. Set ``DPINFER_LOG_LEVEL`` (``DEBUG``,
``INFO``, ``WARNING``) to change verbosity.
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "dpinfer"
_role = "main"
_rank: int | None = None


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        record.rank = "-" if _rank is None else str(_rank)
        return True


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not getattr(root, "_dpinfer_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_ContextFilter())
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s [%(role)s rank=%(rank)s pid=%(process)d] %(name)s: %(message)s"
            )
        )
        root.addHandler(handler)
        root.setLevel(os.environ.get("DPINFER_LOG_LEVEL", "WARNING").upper())
        root.propagate = False
        root._dpinfer_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``dpinfer`` hierarchy (role, rank and pid on every line)."""
    _configure_root()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_role(role: str, rank: int | None = None) -> None:
    """Name this process's role (``coordinator``, ``rank``, ``scheduler``...) for its log lines."""
    global _role, _rank
    _role, _rank = role, rank


def set_level(level: str | int) -> None:
    _configure_root().setLevel(level.upper() if isinstance(level, str) else level)
