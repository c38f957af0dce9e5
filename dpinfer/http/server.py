"""The HTTP front's processes: ``start_http_front(config)`` spawns ``api_workers`` API workers
on one port and returns an ``HttpFront`` handle once every one of them serves.

Each worker binds its own listening socket with ``SO_REUSEPORT`` (the kernel spreads new
connections over them) and runs uvicorn (uvloop, httptools, no access log) with one
``create_app`` app. The parent first binds the port without listening, so ``port=0`` gives
every worker the same free port, and holds it until the front stops. Workers sit in their own
process group (a terminal's Ctrl-C reaches only the launcher, which stops them in order) and
die with their parent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from dpinfer.errors import DpinferError
from dpinfer.http.config import HttpConfig, url_of
from dpinfer.log import get_logger, set_role
from dpinfer.procutil import die_with_parent, set_process_name

logger = get_logger(__name__)
LISTEN_BACKLOG = 4096


class HttpFrontError(DpinferError):
    """The HTTP front could not start (port in use, a worker failed)."""


@dataclass
class HttpFront:
    """Running API workers: ``url`` is where clients go; ``stop()`` ends them."""

    config: HttpConfig
    """The config the workers run (``port`` is the bound one)."""
    processes: list[BaseProcess]
    _reservation: socket.socket = field(repr=False)

    @property
    def url(self) -> str:
        return url_of(self.config.host, self.config.port)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def stop(self) -> None:
        """SIGTERM every worker (open requests get ``graceful_shutdown_s``), then kill stragglers."""
        for proc in self.processes:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.graceful_shutdown_s + 5.0
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("API worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        self._reservation.close()


def start_http_front(config: HttpConfig, timeout_s: float = 60.0) -> HttpFront:
    """Spawn the API workers and wait (at most ``timeout_s``) until each one serves."""
    reservation = _reuseport_socket(config.host, config.port)
    config = dataclasses.replace(config, port=reservation.getsockname()[1])
    ctx = mp.get_context("spawn")
    processes: list[BaseProcess] = []
    conns: list[Connection] = []
    front = HttpFront(config, processes, reservation)
    try:
        for index in range(config.api_workers):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, args=(config, index, child_conn),
                               name=f"dpinfer-http-{index}", daemon=True)  # fmt: skip
            proc.start()
            child_conn.close()
            processes.append(proc)
            conns.append(parent_conn)
        _wait_ready(processes, conns, timeout_s)
    except BaseException:
        front.stop()
        raise
    finally:
        for conn in conns:
            conn.close()
    return front


def _wait_ready(processes: list[BaseProcess], conns: list[Connection], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = dict(zip(conns, processes, strict=True))
    while waiting:
        sentinels = {p.sentinel: c for c, p in waiting.items()}
        ready = mp.connection.wait([*waiting, *sentinels], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise HttpFrontError(f"{len(waiting)} API worker(s) did not start within {timeout_s:g} s")
        for item in ready:
            conn = (
                item
                if isinstance(item, Connection)
                else sentinels.get(item)
                if isinstance(item, int)
                else None
            )
            if conn is None or conn not in waiting:
                continue
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", f"exited with code {waiting[conn].exitcode}"
            if status != "ready":
                raise HttpFrontError(f"an API worker failed to start: {value}")
            del waiting[conn]


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HttpFrontError(f"cannot bind the HTTP front to {host}:{port}: {e.strerror}") from None
    return sock


def _worker_main(config: HttpConfig, index: int, conn: Connection) -> None:
    """One API worker: build -> ready (from the app's start-up) -> serve -> clean shutdown."""
    os.setpgrp()
    die_with_parent()
    set_process_name(f"dpinfer-http{index}")
    set_role("http", rank=index)
    try:
        import uvicorn

        from dpinfer.http.app import create_app

        sock = _reuseport_socket(config.host, config.port)
        sock.listen(LISTEN_BACKLOG)
        app = create_app(config, on_ready=lambda: conn.send(("ready", os.getpid())))
        server = uvicorn.Server(
            uvicorn.Config(
                app, loop=_loop(), http="httptools", lifespan="on", access_log=False,
                log_level="warning", timeout_graceful_shutdown=int(config.graceful_shutdown_s),
                server_header=False,
            )
        )  # fmt: skip
        server.run(sockets=[sock])
    except Exception as e:  # noqa: BLE001 - reported to the launcher, which says why
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
