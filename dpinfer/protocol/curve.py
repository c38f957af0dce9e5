"""CurveZMQ for the coordinator and its peers: key files, server setup, client setup.

Layout of a key directory (``dpinfer keys --out DIR --name NAME`` writes ``NAME.key`` and
``NAME.key_secret``, the ``zmq.auth.create_certificates`` format):

- coordinator ``--curve DIR``: ``DIR/server.key_secret`` (its key pair) and the public keys
  allowed to connect, by role (nothing else gets in):

  - ``DIR/authorized/ranks/*.key``: engine ranks; only they may register;
  - ``DIR/authorized/clients/*.key``: clients; they submit, abort their own requests and read
    status, and may not register or send control signals;
  - ``DIR/authorized/admins/*.key``: operators; everything a client may, plus control signals;
  - ``DIR/authorized/*.key`` (the layout before roles): every role, with a warning at start;
- a peer (client or engine rank) ``--curve-dir DIR``: its own key pair (``client.key_secret``,
  or the only ``*.key_secret`` other than ``server.key_secret``) and ``DIR/server.key``
  (the coordinator's public key).

A peer without an authorized key fails the CURVE handshake inside ZMQ: none of its frames
reach the coordinator's loop, and it gets no reply.
"""

from __future__ import annotations

import enum
import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dpinfer.config import ConfigError
from dpinfer.log import get_logger

logger = get_logger(__name__)

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized"


class Role(enum.StrEnum):
    """What a peer's key lets it do; the coordinator reads it from each peer's CURVE key."""

    RANK = "rank"
    CLIENT = "client"
    ADMIN = "admin"
    ANY = "any"
    """A key of the layout before roles, or every peer when CURVE is off (loopback)."""


ROLE_DIRS = {Role.RANK: "ranks", Role.CLIENT: "clients", Role.ADMIN: "admins"}
"""Where each role's public keys live under ``DIR/authorized/``."""


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("--curve: this libzmq was built without CURVE support")


def create_keys(
    out_dir: str, name: str = SERVER_NAME, server_dir: str | None = None, role: Role | None = None
) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``out_dir``; return their paths.

    With ``server_dir`` (a coordinator's ``--curve`` directory that already holds its key pair),
    also authorize the new public key there for ``role`` (without one: every role, the layout
    before roles) and copy the server's public key into ``out_dir``, so ``out_dir`` is a
    complete peer ``--curve-dir``.
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
        if role is not None and role is not Role.ANY:
            authorized = os.path.join(authorized, ROLE_DIRS[role])
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


def load_roles(authorized: str) -> dict[bytes, Role]:
    """Every authorized public key (z85) and its role, from ``authorized/`` and its role dirs."""
    roles: dict[bytes, Role] = {}
    for role, subdir in ROLE_DIRS.items():
        path = os.path.join(authorized, subdir)
        if os.path.isdir(path):
            roles.update(dict.fromkeys(zmq.auth.load_certificates(path), role))
    legacy = zmq.auth.load_certificates(authorized)
    if legacy:
        logger.warning(
            "%d key(s) directly in %s have every role (rank, client, admin); authorize each under "
            "authorized/ranks, authorized/clients or authorized/admins (dpinfer keys --role)",
            len(legacy),
            authorized,
        )
        for key in legacy:
            roles.setdefault(key, Role.ANY)
    return roles


class _RoleAuthenticator(ThreadAuthenticator):
    """A ZAP handler that lets in authorized keys only and names each peer by its role."""

    roles: dict[bytes, Role]

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.roles[z85.encode(client_public_key)].value


class ServerCurve:
    """CURVE on the coordinator's ROUTER: its key pair plus a ZAP authenticator thread.

    Each message a peer sends carries its role as the frame's ``User-Id`` (``role_of``).
    """

    def __init__(self, context: zmq.Context, curve_dir: str) -> None:
        _require_curve()
        self.public, self.secret = _load_pair(os.path.join(curve_dir, f"{SERVER_NAME}.key_secret"), "--curve")
        authorized = os.path.join(curve_dir, AUTHORIZED_DIR)
        if not os.path.isdir(authorized):
            raise ConfigError(f"--curve: {authorized} does not exist (put the allowed public keys there)")
        roles = load_roles(authorized)
        self._auth = _RoleAuthenticator(context)
        self._auth.roles = roles
        # Only the keys found under ``authorized`` pass; an empty directory lets nobody in.
        self._auth.certs["*"] = dict.fromkeys(roles, True)
        self._auth.start()
        counts = {role.value: sum(r is role for r in roles.values()) for role in Role}
        logger.info("CURVE on: authorized keys by role %s in %s", counts, authorized)

    @staticmethod
    def role_of(frame: zmq.Frame) -> Role:
        """The role of the peer that sent ``frame`` (set by the ZAP handler at its handshake)."""
        return Role(str(frame.get("User-Id")))

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
