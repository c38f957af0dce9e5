"""Stop conditions of one request, checked once per generated token in O(1).

Stop strings are looked for in the decoded tail of the output: the last ``window`` tokens,
enough to spell the longest stop string even one byte per token. Because every step checks,
a match is found on the step whose token completes it. With ``min_tokens``, nothing but the
length stops a request before its ``min_tokens``-th token, and a stop string counts only in
the text of the tokens from that one on (vLLM's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from dpinfer.protocol import FinishReason
from dpinfer.sampling import SamplingParams

BYTES_PER_CHAR = 4  # UTF-8: a character may span up to four byte-level tokens


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    matched_stop: str | int | None = None
    hide_last_token: bool = False
    """True when the last token is a stop token, which is not part of the output."""
    stop_reason: str | int | None = None
    """What the user sees (vLLM's ``stop_reason``): the stop string, or the id of
    ``stop_token_ids`` that matched; ``None`` for EOS and ``length``."""


class StopChecker:
    """The stop conditions of one request (``eos_token_ids`` are the model's)."""

    def __init__(
        self, sampling: SamplingParams, eos_token_ids: tuple[int, ...], max_context_len: int
    ) -> None:
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.eos_token_ids = frozenset(() if sampling.ignore_eos else eos_token_ids)
        self.min_tokens = sampling.min_tokens
        self.stop_strings = sampling.stop
        self.max_new_tokens = sampling.max_new_tokens
        self.max_context_len = max_context_len
        self.window = BYTES_PER_CHAR * max((len(s) for s in self.stop_strings), default=0) + 2

    def check(self, prompt_len: int, output_ids: list[int], decoder: Any | None) -> Finish | None:
        """Whether the request ends now that ``output_ids[-1]`` was generated.

        ``decoder`` (a tokenizer) is needed only when the request has stop strings.
        """
        last, num_output = output_ids[-1], len(output_ids)
        if num_output >= self.min_tokens:
            if last in self.stop_token_ids:
                reason = None if last in self.eos_token_ids else last
                return Finish(FinishReason.STOP, last, hide_last_token=True, stop_reason=reason)
            if self.stop_strings and decoder is not None:
                start = max(num_output - self.window, self.min_tokens - 1, 0)
                tail = decoder.decode(output_ids[start:], skip_special_tokens=True)
                for s in self.stop_strings:
                    if s in tail:
                        return Finish(FinishReason.STOP, s, stop_reason=s)
        if len(output_ids) >= self.max_new_tokens:
            return Finish(FinishReason.LENGTH)
        if prompt_len + len(output_ids) >= self.max_context_len:
            return Finish(FinishReason.LENGTH)
        return None
