"""``SamplingParams``: how one request is decoded. Validated once, on construction.

``SamplingParams`` is a frozen ``msgspec.Struct`` (as vLLM's is), so the request body
(``dpinfer.protocol.bodies.RequestBody``) carries it typed: the client encodes only the
fields that differ from the defaults, and the engine rank decodes it refusing unknown
fields. ``__post_init__`` runs both on construction and on decode, so an SDK user and a
remote client get the same check and the same message for a bad value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from dpinfer.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
"""Stop strings per request (OpenAI allows 4; vLLM has no limit): each costs work on every token."""
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
"""Most alternatives per token for ``logprobs``/``prompt_logprobs`` (OpenAI's ``top_logprobs`` limit)."""
MAX_N = 128
"""Most completions of one prompt (``n``; OpenAI's limit)."""
MAX_PENALTY = 2.0
"""``presence_penalty``/``frequency_penalty`` lie in [-2, 2] (OpenAI's range)."""

SAMPLING_EPS = 1e-5
"""Below this, a temperature or top_p means greedy (as in vLLM): dividing logits by a tinier
temperature, or keeping a tinier probability mass, overflows or underflows float32."""


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Decoding parameters of one request (the same names as vLLM's where they overlap).

    Every field is checked in ``__post_init__``; a bad value raises ``InvalidRequestError``
    naming the field. ``temperature == 0`` means greedy decoding. ``stop`` may be given as
    one string and ``stop``/``stop_token_ids`` as lists; they are stored as tuples.
    """

    max_new_tokens: int = 128
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature (>= 0); 0 (or below ``SAMPLING_EPS``) is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the matched string is not part of the output (unless
    ``include_stop_str_in_output``)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS unless ``ignore_eos``)."""
    seed: int | None = None
    """Per-request seed: the same seed and prompt give the same sampled output."""
    ignore_eos: bool = False
    """Keep generating past EOS until ``max_new_tokens`` or a stop condition."""
    logprobs: int | None = None
    """Per generated token, return its logprob and those of the ``logprobs`` most likely tokens
    (0..``MAX_LOGPROBS``; 0: the sampled token's only). Values are the log-softmax of the
    model's raw logits, before any sampling transform (penalties, ``min_tokens`` masking,
    temperature, top-k, top-p). ``None``: none are computed."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (0..``MAX_LOGPROBS``). A request that
    asks for them computes its whole prompt (the prefix cache is not read for it)."""
    repetition_penalty: float = 1.0
    """``transformers``' rule (> 0; 1 disables): the logit of every token already in the prompt
    or the output is divided by it when positive, multiplied by it when negative."""
    presence_penalty: float = 0.0
    """OpenAI's rule, in [-2, 2]: subtracted once from the logit of every token generated so far."""
    frequency_penalty: float = 0.0
    """OpenAI's rule, in [-2, 2]: subtracted from a token's logit once per time it was generated."""
    min_tokens: int = 0
    """Generate at least this many tokens (<= ``max_new_tokens``): EOS and ``stop_token_ids``
    are masked until then, and a stop string counts only if it lies in the text of the
    tokens from the ``min_tokens``-th on (as in vLLM)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text (what follows it is still cut)."""
    n: int = 1
    """Completions of the prompt (1..``MAX_N``), each its own request with its own result
    (``GenerationResult.index`` 0..n-1), sent together to one rank, which prefills the prompt
    once for all of them. With ``seed``, completion ``j`` samples with ``seed + j`` (as vLLM
    does), so the n results are reproducible and differ from each other. How the SDK returns
    them: ``InferenceClient.generate`` gives n consecutive results per prompt;
    ``AsyncInferenceClient.add_parallel_requests`` one future each."""

    def __post_init__(self) -> None:
        stop: object = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, list | tuple):
            raise InvalidRequestError(f"stop must be a list of strings, got {type(stop).__name__}")
        if not isinstance(self.stop_token_ids, list | tuple):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of ints, got {type(self.stop_token_ids).__name__}"
            )
        msgspec.structs.force_setattr(self, "stop", tuple(stop))
        msgspec.structs.force_setattr(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, minimum=0)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters, got one of {len(s)}"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}"
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 1 << 64:
                raise InvalidRequestError(f"seed must be below 2**64, got {self.seed}")
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)
                if value > MAX_LOGPROBS:
                    raise InvalidRequestError(f"{name} must be <= {MAX_LOGPROBS}, got {value}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        _check_int("n", self.n, minimum=1)
        if self.n > MAX_N:
            raise InvalidRequestError(f"n must be <= {MAX_N}, got {self.n}")
        if self.seed is not None and self.seed + self.n > 1 << 64:
            raise InvalidRequestError("seed + n must be at most 2**64 (completion j samples with seed + j)")
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_tokens}"
            )

    @property
    def greedy(self) -> bool:
        """Decoding picks the most likely token: temperature 0, top_k 1, or a temperature or
        top_p so small that sampling with it would only underflow (float32) to the same choice."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1 or self.top_p < SAMPLING_EPS

    def completions(self) -> list[SamplingParams]:
        """The ``n`` one-completion params the completions are sent with: ``n=1``, and
        ``seed + j`` for completion ``j`` when seeded."""
        if self.n == 1:
            return [self]
        seeds = [None] * self.n if self.seed is None else [self.seed + j for j in range(self.n)]
        return [msgspec.structs.replace(self, n=1, seed=seed) for seed in seeds]

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler must look at the tokens so far (penalties, ``min_tokens``)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.min_tokens > 0
        )

    def to_dict(self) -> dict[str, object]:
        """A msgpack-ready dict holding only the fields that differ from the defaults."""
        fields: dict[str, object] = msgspec.to_builtins(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> SamplingParams:
        """Build from an untrusted mapping; unknown fields and wrong types raise ``InvalidRequestError``."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise InvalidRequestError(
                f"sampling must be a map of sampling parameters, got {type(data).__name__}"
            )
        unknown = sorted(str(k) for k in data if k not in cls.__struct_fields__)
        if unknown:
            valid = ", ".join(sorted(cls.__struct_fields__))
            raise InvalidRequestError(f"unknown sampling field(s): {', '.join(unknown)} (valid: {valid})")
        return cls(**{str(k): v for k, v in data.items()})  # type: ignore[arg-type]


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean, got {type(value).__name__}")


def _check_float(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite, got {value}")
