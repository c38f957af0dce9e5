"""Turn SIGTERM/SIGINT into a readable file descriptor that a ``zmq.Poller`` can watch.

The handler only records the signal; ``signal.set_wakeup_fd`` writes a byte to a pipe so
the poll returns at once, and the loop handles the signal in its normal flow (no work in a
signal handler, no exception thrown into the middle of a send). Only the main thread can
install handlers; elsewhere ``install`` is a no-op and the fd never becomes readable.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from dpinfer.log import get_logger

logger = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalWakeup:
    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._received: list[int] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        try:
            signal.set_wakeup_fd(self._write_fd)
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        except ValueError:
            logger.debug("not the main thread: no signal handling")

    def _record(self, signum: int, _frame: object) -> None:
        self._received.append(signum)

    def pop(self) -> int | None:
        """The latest signal received since the last call (None if the wake-up was spurious)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 512)
        if not self._received:
            return None
        signum, self._received = self._received[-1], []
        return signum

    def close(self) -> None:
        """Restore the previous handlers and close the pipe."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            signal.set_wakeup_fd(-1)
        self._previous.clear()
        os.close(self.fd)
        os.close(self._write_fd)
