"""API and admin keys (the scheme is in ``dpinfer.http.config``): bearer tokens, compared in
constant time."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from dpinfer.http.config import HttpConfig, is_loopback
from dpinfer.http.errors import APIError

if TYPE_CHECKING:
    from starlette.requests import Request


class Keys:
    def __init__(self, config: HttpConfig) -> None:
        self._admin = config.admin_api_key.encode() if config.admin_api_key else None
        api = [k.encode() for k in (config.api_key, config.admin_api_key) if k]
        self._api = tuple(api)

    def check_api(self, request: Request) -> None:
        """``/v1/*``: open without keys, else the API key (or the admin key) is needed."""
        if self._api and not any(hmac.compare_digest(_bearer(request), k) for k in self._api):
            raise _unauthorized(request)

    def check_admin(self, request: Request) -> None:
        """Control endpoints: the admin key; without any key, loopback clients only."""
        if self._admin is not None:
            if not hmac.compare_digest(_bearer(request), self._admin):
                raise _unauthorized(request, "admin ")
            return
        if self._api:
            raise APIError(
                403, "control endpoints are off: this front has an API key but no --admin-api-key",
                code="control_disabled",
            )  # fmt: skip
        client = request.client
        if not is_loopback(client.host if client else None):
            raise APIError(
                403, "without --admin-api-key, control endpoints answer loopback clients only",
                code="control_disabled",
            )  # fmt: skip


def _bearer(request: Request) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def _unauthorized(request: Request, which: str = "") -> APIError:
    given = "no" if not request.headers.get("authorization") else "a wrong"
    return APIError(
        401, f"{given} {which}API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
    )
