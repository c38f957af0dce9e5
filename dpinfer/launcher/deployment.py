"""One single-node deployment: a coordinator process plus ``torchrun`` for the ranks.

``Deployment.start()`` launches both, returns once every rank has registered, and then starts
the HTTP front when ``ServeConfig.http`` asks for one; ``Deployment.stop()`` stops in the
reverse order: the HTTP front (no new requests), then the ranks, drained (or aborted) through
the coordinator, torchrun, the coordinator, and any shared memory the deployment left. Used by
``dpinfer serve``, ``dpinfer demo``, ``dpinfer bench serve`` and the tests.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dpinfer.config import ConfigError, CoordinatorConfig, new_deployment_id
from dpinfer.errors import DpinferError
from dpinfer.log import get_logger

if TYPE_CHECKING:
    from dpinfer.client.sync_client import InferenceClient
    from dpinfer.coordinator.process import CoordinatorHandle
    from dpinfer.http.config import HttpConfig
    from dpinfer.http.server import HttpFront

logger = get_logger(__name__)

PEERS_DIR = "peers"
"""Under a ``--curve`` directory: the peer key directories ``serve`` creates (rank, client, admin)."""
AUTHORIZED = "authorized"

ProgressFn = Callable[[str, Mapping[str, object] | None], None]
"""``progress(message, status)``: what start-up is doing, with the coordinator's status map
once there is one."""


class DeploymentError(DpinferError):
    """The deployment could not start (a rank failed, or not every rank became ready in time)."""


@dataclass(frozen=True)
class ServeConfig:
    """What ``dpinfer serve`` starts. ``engine_args`` are passed to every rank unchanged."""

    dp: int = 1
    """Number of data-parallel ranks on this node."""
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    engine_args: tuple[str, ...] = ()
    """Engine options (see ``dpinfer.launcher.options``) as command-line arguments."""
    max_restarts: int = 0
    """How often a dead rank is restarted; the other ranks keep serving either way."""
    threads_per_rank: int = 0
    """torch threads per rank on CPU (0: cores / dp)."""
    deployment_id: str = field(default_factory=new_deployment_id)
    ready_timeout_s: float = 600.0
    stop_deadline_s: float = 10.0
    """How long ranks may drain in-flight requests on stop before they are aborted."""
    log_path: str | None = None
    """Where torchrun's output goes (default: inherit this process's stdout/stderr)."""
    http: HttpConfig | None = None
    """The HTTP front to start once every rank is ready (None: none); its ``coordinator`` is
    set to this deployment's address."""

    def __post_init__(self) -> None:
        if self.dp < 1:
            raise ConfigError(f"--dp must be >= 1, got {self.dp}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")


class Deployment:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.address = ""
        self._coordinator: CoordinatorHandle | None = None
        self._torchrun: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._client_keys: tempfile.TemporaryDirectory[str] | None = None
        self._client_curve_dir: str | None = None
        self._own_key: Path | None = None
        self._rank_curve_args: tuple[str, ...] = ()
        self._front: HttpFront | None = None
        self.http_url = ""
        """Where the HTTP front serves ("" without one)."""

    # ------------------------------------------------------------------ start

    def start(self, progress: ProgressFn | None = None) -> str:
        progress = progress or (lambda _msg, _status: None)
        from dpinfer.coordinator.process import start_coordinator

        try:
            progress("starting the coordinator", None)
            self._authorize_own_client()
            try:
                self._coordinator = start_coordinator(self.config.coordinator)
            except RuntimeError as e:  # the child reported why it could not start
                raise DeploymentError(str(e)) from None
            self._coordinator.client_curve_dir = self._client_curve_dir
            self.address = self._coordinator.address
            progress(f"coordinator listening on {self.address}; launching {self.config.dp} rank(s)", None)
            self._torchrun = self._launch_torchrun()
            self._wait_ready(progress)
            if self.config.http is not None:
                self._start_front(self.config.http, progress)
        except BaseException:
            self.stop(drain=False)
            raise
        return self.address

    def _start_front(self, http: HttpConfig, progress: ProgressFn) -> None:
        from dpinfer.http.config import url_of
        from dpinfer.http.server import start_http_front

        progress(f"starting the HTTP front on {url_of(http.host, http.port)}", None)
        curve_dir = http.curve_dir or self._client_curve_dir
        http = dataclasses.replace(http, coordinator=self.address, curve_dir=curve_dir)
        self._front = start_http_front(http)
        self.http_url = self._front.url

    def wait_ranks_gone(self) -> int:
        """Block until torchrun (every rank) has exited; its exit code."""
        assert self._torchrun is not None, "start() first"
        return self._torchrun.wait()

    def _authorize_own_client(self) -> None:
        """With CURVE on, create the keys the deployment needs, and one of its own.

        In the ``--curve`` directory, whatever is missing is created: the coordinator's key
        pair, and ready-to-use peer directories ``peers/rank`` (authorized as a rank; the ranks
        use it unless ``--rank-curve-dir`` says otherwise), ``peers/client`` and
        ``peers/admin`` (for users: ``--curve-dir DIR/peers/client``). The deployment's own
        admin key, for its status and stop calls and its HTTP front, is written to a temporary
        directory; the coordinator reads its authorized keys when it starts, so this happens
        first, and ``stop()`` removes it again.
        """
        server_dir = self.config.coordinator.curve_dir
        if server_dir is None:
            return
        from dpinfer.protocol.curve import ROLE_DIRS, SERVER_NAME, Role, create_keys

        if not Path(server_dir, f"{SERVER_NAME}.key_secret").exists():
            create_keys(server_dir)
            logger.info("created the coordinator's CURVE keys in %s", server_dir)
        for role in (Role.RANK, Role.CLIENT, Role.ADMIN):
            peer_dir = Path(server_dir, PEERS_DIR, role.value)
            if not Path(peer_dir, f"{role.value}.key_secret").exists():
                create_keys(str(peer_dir), role.value, server_dir, role)
                logger.info("created a %s key in %s (use it as --curve-dir)", role.value, peer_dir)
        if "--rank-curve-dir" not in self.config.engine_args:
            self._rank_curve_args = ("--rank-curve-dir", str(Path(server_dir, PEERS_DIR, Role.RANK.value)))
        self._client_keys = tempfile.TemporaryDirectory(prefix="dpinfer-serve-keys-")
        create_keys(self._client_keys.name, self._key_name, server_dir, Role.ADMIN)
        self._own_key = Path(server_dir, AUTHORIZED, ROLE_DIRS[Role.ADMIN], f"{self._key_name}.key")
        self._client_curve_dir = self._client_keys.name

    @property
    def _key_name(self) -> str:
        return f"serve-{self.config.deployment_id}"

    def client(self, timeout_s: float) -> InferenceClient:
        """A sync client of this deployment (with its own CURVE key when CURVE is on)."""
        from dpinfer.client.sync_client import InferenceClient

        return InferenceClient(self.address, timeout_s=timeout_s, curve_dir=self._client_curve_dir)

    def torchrun_command(self) -> list[str]:
        cfg = self.config
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--standalone", f"--nproc_per_node={cfg.dp}", "--max-restarts=0",
            "--module", "dpinfer.launcher.worker",
            "--coordinator", self.address,
            "--deployment-id", cfg.deployment_id,
            "--max-restarts", str(cfg.max_restarts),
            "--threads-per-rank", str(cfg.threads_per_rank),
            *cfg.engine_args, *self._rank_curve_args,
        ]  # fmt: skip

    def _launch_torchrun(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        out: IO[bytes] | None = None
        if self.config.log_path:
            self._log_file = open(self.config.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        # Its own session: a Ctrl-C in the terminal reaches `serve`, which stops the ranks in order.
        return subprocess.Popen(
            self.torchrun_command(), env=env, stdout=out, stderr=out, start_new_session=True
        )

    def _wait_ready(self, progress: ProgressFn) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        last_seen = -1
        with self.client(timeout_s=10.0) as client:
            while True:
                status = client.status()
                alive = [r for r in status.get("ranks", []) if r.get("alive")]
                if len(alive) != last_seen:
                    last_seen = len(alive)
                    progress(f"{len(alive)}/{self.config.dp} rank(s) ready", status)
                if len(alive) >= self.config.dp:
                    return
                assert self._torchrun is not None
                if self._torchrun.poll() is not None:
                    raise DeploymentError(
                        f"torchrun exited with code {self._torchrun.returncode} before every rank was ready"
                        + (f"; see {self.config.log_path}" if self.config.log_path else "")
                    )
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"only {len(alive)} of {self.config.dp} rank(s) ready after "
                        f"{self.config.ready_timeout_s:.0f} s"
                    )
                # Ranks take seconds to load a model; a short status poll is cheap and bounded.
                time.sleep(0.2)

    # ------------------------------------------------------------------ stop

    def stop(self, drain: bool = True) -> None:
        """Stop the HTTP front, the ranks (drain or abort, every request gets a reply), torchrun
        and the coordinator."""
        if self._front is not None:
            self._front.stop()
            self._front = None
        running = self._torchrun is not None and self._torchrun.poll() is None
        if running and (self._coordinator is None or not self._stop_ranks(drain)):
            assert self._torchrun is not None
            _signal_group(self._torchrun, signal.SIGTERM)
        if self._torchrun is not None:
            self._wait_torchrun(self.config.stop_deadline_s + 30.0)
        if self._coordinator is not None:
            self._coordinator.stop()
            self._coordinator = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._client_keys is not None:
            if self._own_key is not None:
                self._own_key.unlink(missing_ok=True)
            self._client_keys.cleanup()
            self._client_keys = None
        self._cleanup_shared_memory()

    def _stop_ranks(self, drain: bool) -> bool:
        """STOP through the coordinator (every request gets its final reply); False if that failed."""
        try:
            with self.client(timeout_s=5.0) as client:
                client.stop_engines(drain=drain, deadline_s=self.config.stop_deadline_s)
            return True
        except DpinferError as e:
            logger.warning("stopping the ranks through the coordinator failed (%s); terminating torchrun", e)
            return False

    def _wait_torchrun(self, timeout_s: float) -> None:
        proc = self._torchrun
        assert proc is not None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("torchrun did not exit within %.0f s; sending SIGTERM", timeout_s)
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=15.0)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self._torchrun = None

    def _cleanup_shared_memory(self) -> None:
        try:
            from dpinfer.transport.shm import cleanup_stale_segments
        except ImportError:
            return
        cleanup_stale_segments(self.config.deployment_id)

    @property
    def torchrun_pid(self) -> int | None:
        return self._torchrun.pid if self._torchrun else None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
