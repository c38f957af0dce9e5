"""Incremental, UTF-8-safe detokenization with stop-string hold-back (pure logic, no I/O).

Three layers, each usable alone:

- ``IncrementalDecoder`` turns a growing token list into text pieces. It keeps two offsets
  into the token list (as in TGI/SGLang/vLLM): ``prefix_offset`` starts the small window of
  already-emitted tokens that gives the next tokens their context (leading spaces,
  merges), ``read_offset`` is the first token not yet emitted. Each step decodes only
  ``ids[prefix_offset:]`` -- a bounded window -- never the whole output. A character split
  across tokens is held back until it is complete (the decode shows no new text, or ends
  in U+FFFD), at most ``MAX_HELD_TOKENS`` tokens, so a model emitting invalid bytes
  forever cannot make the window grow without bound.
- ``StopStringBuffer`` releases text only when it cannot be the start of a stop string,
  and never releases a stop string or anything after it.
- ``RequestDetokenizer`` combines both for one request and remembers the released text.

Contract: the concatenation of every ``step`` result and the ``finish`` result is the
request's final text (the stop string and what follows it cut off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DecodeFn = Callable[[Sequence[int]], str]

REPLACEMENT_CHAR = "\ufffd"
MAX_HELD_TOKENS = 8
"""Most tokens held back waiting for a character to complete (UTF-8 needs at most 4 bytes)."""
PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded as context before the first output token (its leading space)."""


class IncrementalDecoder:
    """Decode a growing list of token ids into text pieces, holding back split characters."""

    def __init__(self, decode: DecodeFn, context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self.token_ids: list[int] = list(context_ids)
        self.num_context = len(self.token_ids)
        self.prefix_offset = 0
        self.read_offset = self.num_context

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_context

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_context :]

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids``; return the text that is now complete (maybe ``""``)."""
        self.token_ids.extend(new_ids)
        return self._advance(force=False)

    def flush(self) -> str:
        """Return whatever is still held back, incomplete characters included (end of output)."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        ids = self.token_ids
        if self.read_offset >= len(ids):
            return ""
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(ids[self.prefix_offset :])
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR)
        held_too_long = len(ids) - self.read_offset > MAX_HELD_TOKENS
        if not (complete or force or held_too_long):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        return new_text[len(prefix_text) :]


class StopStringBuffer:
    """Release text only once it cannot be (the start of) a stop string.

    ``push`` returns the releasable part of the text seen so far; ``finish`` returns the
    remainder at the end of the request, cut at the first stop string.
    """

    def __init__(self, stop: Sequence[str] = (), include_stop: bool = False) -> None:
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        """Release the stop string itself (``include_stop_str_in_output``), not what follows."""
        self.pending = ""
        self.found: str | None = None
        """The stop string found in the text, if any (then nothing more is released)."""

    def push(self, text: str) -> str:
        if not self.stop:
            return text
        self.pending += text
        if self.found is not None:
            return ""
        hit = self._first_stop(self.pending)
        if hit is not None:
            index, self.found = hit
            cut = index + len(self.found) if self.include_stop else index
            released, self.pending = self.pending[:cut], self.pending[cut:]
            return released
        keep = self._longest_partial_suffix(self.pending)
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released

    def finish(self, matched_stop: str | None = None) -> str:
        """The text still to release at the end; the stop string and what follows are dropped."""
        pending, self.pending = self.pending, ""
        if self.found is not None:
            return ""
        if matched_stop:
            index = pending.find(matched_stop)
            if index >= 0:
                self.found = matched_stop
                return pending[: index + len(matched_stop) if self.include_stop else index]
        return pending

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            index = text.find(s)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, s)
        return best

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class RequestDetokenizer:
    """Incremental text of one request: ``step`` per batch of new tokens, ``finish`` once."""

    def __init__(
        self,
        decode: DecodeFn,
        stop: Sequence[str] = (),
        context_ids: Sequence[int] = (),
        min_tokens: int = 0,
        include_stop: bool = False,
    ) -> None:
        self.decoder = IncrementalDecoder(decode, context_ids[-PROMPT_CONTEXT_TOKENS:] if context_ids else ())
        self.stops = StopStringBuffer(stop, include_stop)
        self._parts: list[str] = []
        self.finished = False
        self._unchecked_tokens = max(0, min_tokens - 1)
        """The first tokens, whose text no stop string may start in (``min_tokens``, as the
        scheduler's ``StopChecker``): it bypasses the stop-string buffer."""

    @property
    def token_ids(self) -> list[int]:
        return self.decoder.output_ids

    @property
    def num_tokens(self) -> int:
        return self.decoder.num_output_tokens

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._parts)

    def step(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return newly released text (``""`` while held back)."""
        assert not self.finished, "step() after finish()"
        released = self._add(new_ids)
        if released:
            self._parts.append(released)
        return released

    def finish(self, new_ids: Sequence[int] = (), matched_stop: str | None = None) -> str:
        """Add the last tokens and end the request; return the last piece of text."""
        assert not self.finished, "finish() twice"
        self.finished = True
        released = self._add(new_ids)
        released += self.stops.push(self.decoder.flush())
        released += self.stops.finish(matched_stop)
        if released:
            self._parts.append(released)
        return released

    def _add(self, new_ids: Sequence[int]) -> str:
        unchecked = self._unchecked_tokens - self.decoder.num_output_tokens
        if unchecked <= 0 or not self.stops.stop:
            return self.stops.push(self.decoder.add(new_ids))
        released = self.decoder.add(new_ids[:unchecked])
        rest = new_ids[unchecked:]
        return released + self.stops.push(self.decoder.add(rest)) if rest else released
