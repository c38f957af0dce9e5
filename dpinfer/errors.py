"""Typed errors shared by the client, the coordinator and the engine ranks."""

from __future__ import annotations


class DpinferError(Exception):
    """Base class of every error dpinfer raises on purpose."""


class ProtocolError(DpinferError):
    """A frame or message body that does not decode into a valid message."""


class InvalidRequestError(DpinferError, ValueError):
    """A request or parameter the caller must fix (bad sampling value, empty prompt...)."""


class ServiceError(DpinferError):
    """The service answered with an error (invalid control transition, engine failure...)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class RequestTimeoutError(DpinferError, TimeoutError):
    """No answer arrived within the caller's ``timeout_s``."""


class ConnectionLostError(DpinferError, ConnectionError):
    """The coordinator went away (shut down, or unreachable) while a call was waiting."""


class ReconnectTimeoutError(ConnectionLostError):
    """The client lost its coordinator and none answered within its ``reconnect_window_s``."""


class TransportError(DpinferError):
    """The tensor channel inside a rank cannot deliver (closed, peer gone, bad configuration)."""
