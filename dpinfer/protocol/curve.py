"""CurveZMQ for the coordinator and its peers: key files, server setup, client setup.

Layout of a key directory (``dpinfer keys --out DIR --name NAME`` writes ``NAME.key`` and
``NAME.key_secret``, the ``zmq.auth.create_certificates`` format):

- coordinator ``--curve DIR``: ``DIR/server.key_secret`` (its key pair) and
  ``DIR/authorized/*.key`` (the public keys allowed to connect; nothing else gets in);
- a peer (client or engine rank) ``--curve-dir DIR``: its own key pair (``client.key_secret``,
  or the only ``*.key_secret`` other than ``server.key_secret``) and ``DIR/server.key``
  (the coordinator's public key).

A peer without an authorized key fails the CURVE handshake inside ZMQ: none of its frames
reach the coordinator's loop, and it gets no reply.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from dpinfer.config import ConfigError
from dpinfer.log import get_logger

logger = get_logger(__name__)

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized"


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("--curve: this libzmq was built without CURVE support")


def create_keys(out_dir: str, name: str = SERVER_NAME, server_dir: str | None = None) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``out_dir``; return their paths.

    With ``server_dir`` (a coordinator's ``--curve`` directory that already holds its key pair),
    also authorize the new public key there and copy the server's public key into ``out_dir``,
    so ``out_dir`` is a complete peer ``--curve-dir``.
    """
    _require_curve()
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name: {name!r} is not a valid key name")
    os.makedirs(out_dir, exist_ok=True)
    public, secret = zmq.auth.create_certificates(out_dir, name)
    os.chmod(secret, 0o600)
    if name == SERVER_NAME:
        os.makedirs(os.path.join(out_dir, AUTHORIZED_DIR), exist_ok=True)
    if server_dir is not None:
        server_public = os.path.join(server_dir, f"{SERVER_NAME}.key")
        if not os.path.isfile(server_public):
            raise ConfigError(f"--server-dir: {server_public} does not exist (create the server keys first)")
        authorized = os.path.join(server_dir, AUTHORIZED_DIR)
        os.makedirs(authorized, exist_ok=True)
        shutil.copy(public, os.path.join(authorized, f"{name}.key"))
        if os.path.abspath(out_dir) != os.path.abspath(server_dir):
            shutil.copy(server_public, os.path.join(out_dir, f"{SERVER_NAME}.key"))
    return Path(public), Path(secret)


def _load_pair(path: str, flag: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: cannot read key pair {path}: {e}") from None
    if secret is None:
        raise ConfigError(f"{flag}: {path} holds no secret key")
    return public, secret


class ServerCurve:
    """CURVE on the coordinator's ROUTER: its key pair plus a ZAP authenticator thread."""

    def __init__(self, context: zmq.Context, curve_dir: str) -> None:
        _require_curve()
        self.public, self.secret = _load_pair(os.path.join(curve_dir, f"{SERVER_NAME}.key_secret"), "--curve")
        authorized = os.path.join(curve_dir, AUTHORIZED_DIR)
        if not os.path.isdir(authorized):
            raise ConfigError(f"--curve: {authorized} does not exist (put the allowed public keys there)")
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        # Only keys found in ``authorized`` pass; an empty directory lets nobody in.
        self._auth.configure_curve(domain="*", location=authorized)
        logger.info("CURVE on: %d authorized key(s) in %s", len(os.listdir(authorized)), authorized)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server; call before ``bind``."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def peer_keys(curve_dir: str) -> tuple[bytes, bytes, bytes]:
    """``(public, secret, server_public)`` for a client or engine rank from its ``--curve-dir``."""
    _require_curve()
    if not os.path.isdir(curve_dir):
        raise ConfigError(f"--curve-dir: {curve_dir} is not a directory")
    own = os.path.join(curve_dir, "client.key_secret")
    if not os.path.isfile(own):
        candidates = sorted(
            f for f in os.listdir(curve_dir) if f.endswith(".key_secret") and f != f"{SERVER_NAME}.key_secret"
        )
        if len(candidates) != 1:
            raise ConfigError(
                f"--curve-dir: expected client.key_secret or exactly one *.key_secret in {curve_dir}, "
                f"found {candidates or 'none'}"
            )
        own = os.path.join(curve_dir, candidates[0])
    public, secret = _load_pair(own, "--curve-dir")
    try:
        server_public, _ = zmq.auth.load_certificate(os.path.join(curve_dir, f"{SERVER_NAME}.key"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--curve-dir: cannot read the coordinator's public key server.key: {e}") from None
    return public, secret, server_public


def apply_peer_curve(socket: zmq.Socket, curve_dir: str) -> None:
    """Make ``socket`` (a client or rank DEALER) a CURVE client; call before ``connect``."""
    public, secret, server_public = peer_keys(curve_dir)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public
