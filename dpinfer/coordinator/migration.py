"""Mid-stream migration: what a client has seen of a streamed request, and its continuation.

When the rank of a streaming request dies, is declared dead or terminates on its own after
the client saw some of the output, the request goes on on another rank from its prompt
plus the tokens generated so far (``bodies.Resume``). The client sees one uninterrupted
result: the new rank streams only what follows, and its final output holds the whole text
and token ids; for greedy decoding they equal an undisturbed run's.

The continuation is built here, in the hub, because only the hub knows both that a rank
went away and what of each request's output was forwarded to its client (the rank that
made it is gone; the SDK and the HTTP front would each need their own copy of the logic
and a round trip). The cost is kept off everything but streamed partial outputs: for those
the hub reads the two delta fields of the body (one small msgspec decode) and appends the
token ids; non-streaming requests and finals cost nothing more. The request body itself
is decoded and re-encoded only when a migration happens.
"""

from __future__ import annotations

import msgspec
import zmq

from dpinfer.protocol.bodies import RequestBody, Resume
from dpinfer.protocol.codec import Frame


class _Delta(msgspec.Struct):
    """The two fields of an ``OutputBody`` a streamed partial output carries (the rest are
    skipped unread)."""

    delta_text: str = ""
    delta_token_ids: tuple[int, ...] = ()


_decode_delta = msgspec.msgpack.Decoder(_Delta).decode


class Streamed:
    """The output of one request its client has received so far, across every attempt."""

    __slots__ = ("broken", "text_chars", "token_ids")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text_chars = 0
        self.broken = False
        """A partial output did not decode: the request cannot be continued exactly."""

    def add(self, body: Frame) -> None:
        try:
            delta = _decode_delta(body.buffer if isinstance(body, zmq.Frame) else body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.broken = True
            return
        self.token_ids.extend(delta.delta_token_ids)
        self.text_chars += len(delta.delta_text)


def continuation(body: Frame, streamed: Streamed) -> bytes:
    """The request body that continues ``body`` after the output in ``streamed``.

    A body that was itself a continuation (a client resubmitting after a coordinator
    restart) keeps its resumed tokens in front of the ones streamed since.
    """
    request = RequestBody.from_bytes(body)
    prior_ids: tuple[int, ...] = ()
    prior_chars = 0
    if request.resume is not None:
        prior_ids, prior_chars = request.resume.token_ids, request.resume.text_chars
    resume = Resume(prior_ids + tuple(streamed.token_ids), prior_chars + streamed.text_chars)
    return msgspec.structs.replace(request, resume=resume).to_bytes()
