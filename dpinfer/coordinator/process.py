"""Running a coordinator: in this process (``run_coordinator``) or in a spawned one.

``start_coordinator`` spawns a process, waits (with a timeout) for its ready message carrying
the bound address over a pipe, and returns a ``CoordinatorHandle``; a coordinator that fails
to start (port taken, bad CURVE directory...) raises ``RuntimeError`` with its error.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

import zmq

from dpinfer import protocol
from dpinfer.config import CoordinatorConfig
from dpinfer.errors import ProtocolError
from dpinfer.log import get_logger, set_role
from dpinfer.procutil import die_with_parent, set_process_name

logger = get_logger(__name__)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Once is enough: further signals must not interrupt the clean shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_coordinator(config: CoordinatorConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Build a coordinator, report its address to ``on_ready``, serve until SHUTDOWN/SIGTERM/Ctrl-C."""
    from dpinfer.coordinator.server import Coordinator

    set_role("coordinator")
    coordinator = Coordinator(config)
    previous: dict[signal.Signals, Any] = {}
    wake_r, wake_w = socket.socketpair()
    previous_wakeup_fd: int | None = None
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, _interrupt)
        # A signal that lands just before the loop blocks in poll would otherwise wait for the
        # next message: the wakeup fd makes poll return so the handler runs.
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_wakeup_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        if on_ready is not None:
            on_ready(coordinator.address)
        coordinator.run(wakeup_fd=wake_r.fileno())
    except KeyboardInterrupt:
        pass  # run() handles an interrupt inside its loop; this covers the moments around it
    finally:
        coordinator.close()
        if previous_wakeup_fd is not None:
            signal.set_wakeup_fd(previous_wakeup_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake_r.close()
        wake_w.close()


def _coordinator_main(config: CoordinatorConfig, conn: multiprocessing.connection.Connection) -> None:
    # The parent manages this process: a Ctrl-C in its terminal must reach the parent only
    # (which stops the ranks through us first), and the parent's death must end us too.
    os.setpgrp()
    die_with_parent(signal.SIGTERM)
    set_process_name("dpinfer-coord")
    try:
        run_coordinator(config, on_ready=lambda address: conn.send(("ready", address)))
    except Exception as e:
        logger.exception("coordinator failed")
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        conn.close()


@dataclass
class CoordinatorHandle:
    """A coordinator running in a child process."""

    address: str
    pid: int
    process: Any
    """The ``multiprocessing`` process object."""
    client_curve_dir: str | None = None
    """A client key directory, so ``stop()`` can reach a CURVE coordinator."""

    def stop(self, timeout_s: float = 10) -> None:
        """Ask for SHUTDOWN (ranks stop, clients are told), wait, then terminate if needed."""
        if self.process.is_alive():
            try:
                _send_shutdown(self.address, self.client_curve_dir, timeout_s / 2)
            except (zmq.ZMQError, OSError) as e:
                logger.warning("could not send SHUTDOWN to %s: %s", self.address, e)
            self.process.join(timeout_s / 2)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)


def _send_shutdown(address: str, curve_dir: str | None, timeout_s: float) -> None:
    context: zmq.Context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # a refused CURVE handshake blocks sends
    try:
        if curve_dir is not None:
            from dpinfer.protocol.curve import apply_peer_curve

            apply_peer_curve(sock, curve_dir)
        sock.connect(address)
        sock.send_multipart(protocol.encode(protocol.ClientHello(protocol.PROTOCOL_VERSION, "shutdown")))
        sock.send_multipart(protocol.encode(protocol.Control(0, protocol.Signal.SHUTDOWN.value, {})))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return
            msg = protocol.decode(sock.recv_multipart())
            if isinstance(msg, protocol.Notice | protocol.ControlReply):
                return
    except ProtocolError:
        return
    finally:
        sock.close()


def start_coordinator(config: CoordinatorConfig, timeout_s: float = 30) -> CoordinatorHandle:
    """Spawn a coordinator process and wait until it listens; its address is in the handle."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_coordinator_main, args=(config, child_conn), name="dpinfer-coordinator", daemon=True
    )
    process.start()
    child_conn.close()
    try:
        ready = multiprocessing.connection.wait([parent_conn, process.sentinel], timeout_s)
        if parent_conn in ready:
            try:
                status, value = parent_conn.recv()
            except EOFError:
                status, value = "error", f"exited with code {process.exitcode}"
            if status == "ready":
                return CoordinatorHandle(value, cast(int, process.pid), process)  # set by start()
            raise RuntimeError(f"the coordinator failed to start: {value}")
        if not ready:
            raise RuntimeError(f"the coordinator did not report ready within {timeout_s:g} s")
        process.join(1)
        raise RuntimeError(f"the coordinator exited with code {process.exitcode} before it was ready")
    except BaseException:
        if process.is_alive():
            process.kill()
        process.join(5)
        raise
    finally:
        parent_conn.close()
