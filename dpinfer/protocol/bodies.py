"""Message bodies: the msgpack maps the coordinator forwards without decoding."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from dpinfer.errors import ProtocolError
from dpinfer.protocol.kinds import FinishReason

_packb = msgpack.Packer(use_bin_type=True).pack

# ---------------------------------------------------------------------------- bodies


def pack_body(data: dict[str, Any]) -> bytes:
    return _packb(data)


def unpack_body(frame: Any, what: str = "body") -> dict[str, Any]:
    raw = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001
        raise ProtocolError(f"undecodable {what}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a map, got {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class OutputBody:
    """What a rank sends back for one request (an ``Outputs``/``EngineOutputs`` body).

    Partial (streamed) outputs carry ``delta_text``/``delta_token_ids`` only. The final
    output carries the whole ``text`` and ``token_ids``, plus for streamed requests the
    last ``delta_text``/``delta_token_ids`` not yet sent, and the counters.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    delta_text: str = ""
    delta_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_bytes(self) -> bytes:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return _packb(out)

    @classmethod
    def from_bytes(cls, frame: Any) -> OutputBody:
        data = unpack_body(frame, "output body")
        try:
            body = cls(**data)
        except TypeError as e:
            raise ProtocolError(f"output body: {e}") from None
        object.__setattr__(body, "token_ids", tuple(body.token_ids))
        object.__setattr__(body, "delta_token_ids", tuple(body.delta_token_ids))
        return body


def error_body(message: str, reason: FinishReason = FinishReason.ERROR) -> bytes:
    """The final output body of a request that ends without generating (error, abort)."""
    return OutputBody(finish_reason=reason.value, error=message).to_bytes()


REQUEST_BODY_FIELDS = frozenset({"prompt", "messages", "images", "sampling", "model_inputs"})
"""Keys of a request body (a msgpack map), validated by the engine rank:

- ``prompt``: str, or a list of token ids; or
- ``messages``: list of ``{"role": str, "content": str}`` (chat template applied by the rank);
- ``images``: optional list; each item is encoded image ``bytes`` or a raw array map
  ``{"shape": [h, w, c], "dtype": "uint8", "data": bytes}``;
- ``sampling``: ``SamplingParams.to_dict()``.
"""
