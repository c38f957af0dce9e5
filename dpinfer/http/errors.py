"""OpenAI's error object, the status of each failure, and what a failed request maps to.

Every error the front returns is ``{"error": {"message", "type", "param", "code"}}``:

======  ==========================  ==============================================================
status  type                        when
======  ==========================  ==============================================================
400     ``invalid_request_error``   a bad parameter (``param`` names it), or the rank refused it
401     ``authentication_error``    a missing or wrong key
403     ``permission_error``        a control endpoint that this front's keys do not open
404     ``not_found_error``         an unknown model (``param`` is ``model``) or path
405     ``invalid_request_error``   a method the path does not take
409     ``conflict_error``          a control signal the deployment's state does not allow
413     ``invalid_request_error``   a body over ``--max-body-bytes``
429     ``rate_limit_error``        the coordinator answered ``overloaded``
503     ``service_unavailable``     no rank serving, the coordinator unreachable, ranks stopping
500     ``server_error``            a bug on the serving side (never for client input)
======  ==========================  ==============================================================
"""

from __future__ import annotations

import msgspec

from dpinfer.errors import InvalidRequestError
from dpinfer.outputs import GenerationResult

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

_STATUS_OF_CODE = {
    "invalid_request": 400,
    "overloaded": 429,
    "unavailable": 503,
    "aborted": 503,
    "duplicate_request": 500,
    "internal": 500,
}
"""``GenerationResult.error_code`` (``protocol.ErrorCode``) -> HTTP status."""

_PREFIXES = (
    ("invalid request:", "invalid_request"),
    ("invalid_request:", "invalid_request"),
    ("overloaded", "overloaded"),
    ("duplicate_request:", "duplicate_request"),
    ("tokenizer error:", "internal"),
    ("detokenization failed", "internal"),
)
"""Error texts of a service that does not send ``error_code`` yet, by their first words."""


class APIError(Exception):
    """A failure with its HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": _TYPES.get(
                self.status, "server_error" if self.status >= 500 else "invalid_request_error"
            ),
            "param": self.param,
            "code": self.code,
        }
        return msgspec.json.encode({"error": error})


def invalid(error: InvalidRequestError | str, param: str | None = None) -> APIError:
    return APIError(400, str(error), param=param, code="invalid_value" if param else None)


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="unavailable")


def error_code_of(result: GenerationResult) -> str:
    """Why ``result`` failed, for machines: its ``error_code``, else read off its error text."""
    code: str | None = getattr(result, "error_code", None)
    if code:
        return code
    text = (result.error or "").lower()
    for prefix, name in _PREFIXES:
        if text.startswith(prefix):
            return name
    return "aborted" if result.finish_reason == "abort" else "unavailable"


def result_error(result: GenerationResult) -> APIError:
    """The ``APIError`` of a request that did not finish with ``stop`` or ``length``."""
    code = error_code_of(result)
    status = _STATUS_OF_CODE.get(code, 500)
    message = result.error or f"the request ended with finish_reason {result.finish_reason!r}"
    if status == 400:
        message = message.removeprefix("invalid request: ")
    return APIError(status, message, code=code)
