"""Stop conditions of one request, checked once per generated token in O(1).

Stop strings are looked for in the decoded tail of the output: the last ``window`` tokens,
enough to spell the longest stop string even one byte per token. Because every step checks,
a match is found on the step whose token completes it.
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


class StopChecker:
    """The stop conditions of one request (``eos_token_ids`` are the model's)."""

    def __init__(
        self, sampling: SamplingParams, eos_token_ids: tuple[int, ...], max_context_len: int
    ) -> None:
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_token_ids = frozenset(stop_ids)
        self.stop_strings = sampling.stop
        self.max_new_tokens = sampling.max_new_tokens
        self.max_context_len = max_context_len
        self.window = BYTES_PER_CHAR * max((len(s) for s in self.stop_strings), default=0) + 2

    def check(self, prompt_len: int, output_ids: list[int], decoder: Any | None) -> Finish | None:
        """Whether the request ends now that ``output_ids[-1]`` was generated.

        ``decoder`` (a tokenizer) is needed only when the request has stop strings.
        """
        last = output_ids[-1]
        if last in self.stop_token_ids:
            return Finish(FinishReason.STOP, last, hide_last_token=True)
        if self.stop_strings and decoder is not None:
            tail = decoder.decode(output_ids[-self.window :], skip_special_tokens=True)
            for s in self.stop_strings:
                if s in tail:
                    return Finish(FinishReason.STOP, s)
        if len(output_ids) >= self.max_new_tokens:
            return Finish(FinishReason.LENGTH)
        if prompt_len + len(output_ids) >= self.max_context_len:
            return Finish(FinishReason.LENGTH)
        return None
