"""An untrusted body -> a typed request: JSON decoding and type errors in OpenAI's words.

``decode(body, CompletionRequest)`` is one msgspec call; a body that does not fit becomes an
``APIError`` (400) whose ``param`` is the field's path (``messages[0].content``), as OpenAI
names it.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from dpinfer.http.errors import APIError
from dpinfer.http.schemas import ChatCompletionRequest, CompletionRequest, UpdateWeightsRequest

T = TypeVar("T", CompletionRequest, ChatCompletionRequest, UpdateWeightsRequest)

_DECODERS: dict[type, msgspec.json.Decoder[object]] = {
    t: msgspec.json.Decoder(t) for t in (CompletionRequest, ChatCompletionRequest, UpdateWeightsRequest)
}
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<kind>contains unknown|missing required) field `(?P<name>[^`]*)`$")
_EXPECTED = re.compile(r"^Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`$")
_WORDS = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean", "null": "null",
    "array": "a list", "object": "an object",
}  # fmt: skip


def decode(body: bytes, kind: type[T]) -> T:
    """Decode and type-check a JSON body; a problem raises ``APIError`` (400) naming the field."""
    try:
        return _DECODERS[kind].decode(body)  # type: ignore[return-value]
    except msgspec.ValidationError as e:
        raise _type_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def _type_error(text: str) -> APIError:
    match = _AT.match(text)
    assert match is not None  # matches any string
    what, path = match["what"], (match["path"] or "").removeprefix(".")
    if field := _FIELD.match(what):
        param = f"{path}.{field['name']}" if path else field["name"]
        if field["kind"] == "missing required":
            return APIError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
        return APIError(400, f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    param = path or None
    where = path or "the body"
    if typed := _EXPECTED.match(what):
        expected = " or ".join(_WORDS.get(t.strip(), t.strip()) for t in typed["expected"].split("|"))
        got = {"array": "a list", "object": "an object"}.get(typed["got"], typed["got"])
        message = f"{where} must be {expected}, got {got}"
    elif what.startswith("Invalid value"):
        message = f"{where}: {what[0].lower()}{what[1:]}"
    elif what == "Number out of range":
        message = f"{where} is out of range"
    else:
        message = f"{where}: {what}"
    return APIError(400, message, param=param, code="invalid_type")
