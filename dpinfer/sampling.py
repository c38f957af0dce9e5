"""``SamplingParams``: how one request is decoded. Validated once, on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dpinfer.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters of one request (the same names as vLLM's where they overlap).

    Every field is checked in ``__post_init__``; a bad value raises ``InvalidRequestError``
    naming the field. ``temperature == 0`` means greedy decoding.
    """

    max_new_tokens: int = 128
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the matched string is not part of the output."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS unless ``ignore_eos``)."""
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same sampled output."""
    ignore_eos: bool = False
    """Keep generating past EOS until ``max_new_tokens`` or a stop condition."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Reserved; must be empty (kept so unknown-field errors can name the field)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")
        if self.extra:
            raise InvalidRequestError(f"unknown sampling field(s): {', '.join(sorted(self.extra))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-ready dict holding only the fields that differ from the defaults."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> SamplingParams:
        """Build from an untrusted mapping; unknown fields and wrong types raise ``InvalidRequestError``."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidRequestError(f"sampling params must be a map, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {str(k): v for k, v in data.items() if k not in known}
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in ("stop", "stop_token_ids"):
            if name in kwargs and not isinstance(kwargs[name], list | tuple | str):
                raise InvalidRequestError(f"{name} must be a list, got {type(kwargs[name]).__name__}")
        return cls(**kwargs, extra=unknown)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite, got {value}")
