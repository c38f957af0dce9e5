"""TEST AND BENCHMARK FIXTURE: the echo "model" of the null rank (no tokenizer, no weights).

A request's output is ``"echo: " + prompt``, one token per UTF-8 byte, optionally streamed in
``stream_chunks`` pieces: token ids are echoed as numbers, chat messages as their contents.
A continuation (``resume``) streams only the text after the ``resume.text_chars`` characters
the client has, and its final output holds the whole text, as a real rank's does.
The body is decoded like a real rank's (``RequestBody.from_bytes``); a bad one gets the same
``invalid request: ...`` error. Used by ``null_rank`` and ``null_direct``; never by the product.
"""

from __future__ import annotations

import itertools

import msgpack

from dpinfer import protocol
from dpinfer.errors import InvalidRequestError
from dpinfer.protocol import EngineOutputEntry, prefix_keys
from dpinfer.protocol.bodies import RequestBody
from dpinfer.tokenizer.multimodal import content_text

ECHO_PREFIX = "echo: "
_packb = msgpack.Packer(use_bin_type=True).pack


class EchoRequest:
    """One request: its echo text, and (on a slow rank) its planned outputs and progress."""

    __slots__ = (
        "error", "keys", "next_output", "plan", "prompt_tokens", "request_id", "resumed_chars", "step_s",
        "stream", "text",
    )  # fmt: skip

    def __init__(self, request_id: int, stream: bool, body: bytes, with_keys: bool = False) -> None:
        self.request_id = request_id
        self.stream = stream
        self.plan: tuple[list[EngineOutputEntry], list[bytes]] = ([], [])
        self.next_output = 0
        self.step_s = 0.0
        self.error = ""
        self.text = ""
        self.prompt_tokens = 0
        self.resumed_chars = 0
        self.keys: list[int] = []
        try:
            request = RequestBody.from_bytes(body)
        except InvalidRequestError as e:
            self.error = f"invalid request: {e}"
            return
        if request.messages is not None:
            prompt = " ".join(content_text(m.content) for m in request.messages)
        elif isinstance(request.prompt, str):
            prompt = request.prompt
        else:
            prompt = " ".join(str(t) for t in request.prompt or ())
        if with_keys:
            self.keys = prefix_keys.body_keys(request)
        self.text = ECHO_PREFIX + prompt
        self.prompt_tokens = len(prompt.encode())
        if request.resume is not None:
            self.resumed_chars = min(request.resume.text_chars, len(self.text))

    def outputs(self, stream_chunks: int) -> tuple[list[EngineOutputEntry], list[bytes]]:
        """Partial outputs (streamed requests only), then the final one."""
        rid = self.request_id
        if self.error:
            return [EngineOutputEntry(rid, True, 0)], [
                protocol.error_body(self.error, code=protocol.ErrorCode.INVALID_REQUEST)
            ]
        text = self.text
        token_ids = list(text.encode())
        entries: list[EngineOutputEntry] = []
        bodies: list[bytes] = []
        first = self.resumed_chars
        last_delta = text[first:]
        if self.stream and stream_chunks > 0:
            rest = len(text) - first
            step = max(1, rest // (stream_chunks + 1))
            cuts = [first + i * step for i in range(stream_chunks + 1) if i * step < rest] + [len(text)]
            num_tokens = 0
            for start, end in itertools.pairwise(cuts[:-1]):
                piece = text[start:end].encode()
                num_tokens += len(piece)
                entries.append(EngineOutputEntry(rid, False, num_tokens))
                bodies.append(_packb({"delta_text": text[start:end], "delta_token_ids": list(piece)}))
            last_delta = text[cuts[-2] :]
        final: dict[str, object] = {
            "text": text, "token_ids": token_ids, "finish_reason": "stop",
            "prompt_tokens": self.prompt_tokens, "completion_tokens": len(token_ids),
        }  # fmt: skip
        if self.stream:
            final["delta_text"] = last_delta
            final["delta_token_ids"] = list(last_delta.encode())
        entries.append(EngineOutputEntry(rid, True, len(token_ids)))
        bodies.append(_packb(final))
        return entries, bodies


class SimulatedCache:
    """A null rank's stand-in for a prefix cache: the routing keys of the last ``capacity``
    blocks it served, least recently used evicted first, with the events a real rank reports."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.keys: dict[int, None] = {}
        self.inserted: list[int] = []
        self.evicted: list[int] = []

    def serve(self, keys: list[int]) -> None:
        cache = self.keys
        for key in keys:
            if key in cache:
                del cache[key]  # most recently used goes last
            else:
                self.inserted.append(key)
            cache[key] = None
        while len(cache) > self.capacity:
            old = next(iter(cache))
            del cache[old]
            self.evicted.append(old)

    def take(self) -> tuple[bytes, bytes] | None:
        if not (self.inserted or self.evicted):
            return None
        cache = self.keys
        inserted = [k for k in dict.fromkeys(self.inserted) if k in cache]
        evicted = [k for k in dict.fromkeys(self.evicted) if k not in cache]
        out = prefix_keys.pack(inserted), prefix_keys.pack(evicted)
        self.inserted, self.evicted = [], []
        return out
