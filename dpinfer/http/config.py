"""``HttpConfig``: what one HTTP front serves, and how (validated once, errors name the flag).

Keys: with ``api_key`` set, every ``/v1/*`` request needs ``Authorization: Bearer <api_key>``
(or the admin key). The control endpoints (``/pause``, ``/unpause``, ``/suspend``, ``/resume``,
``/update_weights``, ``/status``) need ``Authorization: Bearer <admin_api_key>``; when only
``api_key`` is set they are refused (403), and when no key is set at all they are open to
loopback clients only (as the ``dpinfer`` CLI is). ``/health``, ``/version`` and ``/metrics``
need no key.
"""

from __future__ import annotations

import functools
import importlib.metadata
import ipaddress
import os
from dataclasses import dataclass

from dpinfer.config import DEFAULT_ADDRESS, ConfigError

DEFAULT_HTTP_PORT = 8000
API_KEY_ENV = "DPINFER_API_KEY"
ADMIN_API_KEY_ENV = "DPINFER_ADMIN_API_KEY"


@dataclass(frozen=True)
class HttpConfig:
    coordinator: str = DEFAULT_ADDRESS
    """The coordinator's address (``tcp://HOST:PORT``)."""
    host: str = "127.0.0.1"
    """Interface the HTTP front binds."""
    port: int = DEFAULT_HTTP_PORT
    """TCP port; 0 picks a free one (every API worker shares it)."""
    api_workers: int = 1
    """API worker processes on the one port (SO_REUSEPORT); each is one coordinator client."""
    api_key: str | None = None
    """Bearer key of the ``/v1`` endpoints (none: open)."""
    admin_api_key: str | None = None
    """Bearer key of the control endpoints; it also works as an API key."""
    served_model_name: str | None = None
    """The model name clients use (default: the model the ranks report)."""
    curve_dir: str | None = None
    """This front's CURVE client key directory, when the coordinator uses CURVE."""
    allowed_local_media_path: str | None = None
    """``file://`` images are read only from under this directory (none: never)."""
    max_body_bytes: int = 32 << 20
    """Largest request body (HTTP 413 beyond)."""
    max_choices: int = 1024
    """Most choices (prompts times ``n``) in one request."""
    status_interval_s: float = 1.0
    """How often each worker refreshes its view of the deployment (live ranks, model)."""
    timeout_s: float = 10.0
    """How long a connection attempt, a status or a control call to the coordinator may take."""
    graceful_shutdown_s: float = 5.0
    """How long open connections may finish when the front stops."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--http-port must be in 0..65535, got {self.port}")
        if self.api_workers < 1:
            raise ConfigError(f"--api-workers must be >= 1, got {self.api_workers}")
        for flag, key in (("--api-key", self.api_key), ("--admin-api-key", self.admin_api_key)):
            if key is not None and not key.strip():
                raise ConfigError(f"{flag} must not be empty")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ConfigError(f"--max-choices must be >= 1, got {self.max_choices}")
        if self.allowed_local_media_path is not None:
            path = os.path.realpath(self.allowed_local_media_path)
            if not os.path.isdir(path):
                raise ConfigError(
                    f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a directory"
                )
            object.__setattr__(self, "allowed_local_media_path", path)
        for flag, value in (("--status-interval-s", self.status_interval_s), ("--timeout-s", self.timeout_s)):
            if value <= 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")

    @property
    def keys_set(self) -> bool:
        return self.api_key is not None or self.admin_api_key is not None


def url_of(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 literals in brackets; a wildcard host shown as loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def version() -> str:
    """dpinfer's version (package metadata), for ``/version`` and ``/openapi.json``."""
    try:
        return importlib.metadata.version("dpinfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
