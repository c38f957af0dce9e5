"""TokenizerProcess: request bodies -> ``TokenizedRequest`` on the channel to the scheduler.

Sockets (all ``ipc://``, names from ``engine.messages``):

- ``recv_from_rank`` (PULL, binds ``tokenizer-in``): ``TokenizeRequests``, ``AbortRequests``,
  ``SetLimits``, ``Shutdown`` from the rank main, in order.
- ``send_to_scheduler`` (``transport.channel`` sender to ``scheduler-in``): tokenized
  requests and aborts on ONE ordered channel, so an abort never overtakes its request.
- ``send_to_rank`` (PUSH, connects ``rank-outputs``): error finals for bad requests, which
  never reach the scheduler.

A bad request gets an error reply (``invalid request: `` and the message of the
``InvalidRequestError`` that ``protocol.bodies.RequestBody`` or ``request_parsing`` raised)
and the loop goes on; nothing a client sends can stop it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from dpinfer.config import LocalSocket, RankConfig, ipc_address
from dpinfer.errors import InvalidRequestError
from dpinfer.log import get_logger
from dpinfer.protocol import EngineOutputEntry, ErrorCode, error_body
from dpinfer.protocol import local as m
from dpinfer.tokenizer.prefix_positions import PositionMapper
from dpinfer.tokenizer.request_parsing import MultimodalProcessor, RequestParser, appends_eos, max_token_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dpinfer.runner.registry import ModelSpec
    from dpinfer.transport.tensor_queue import TensorQueue

ReportReady = Callable[[dict[str, object]], None]
"""The supervisor's callback: called once, with a small picklable dict, when the process serves."""

logger = get_logger(__name__)


class TokenizerProcess:
    def __init__(
        self,
        config: RankConfig,
        parser: RequestParser,
        context: zmq.Context,
        tensor_queue: TensorQueue | None = None,
    ) -> None:
        from dpinfer.transport.channel import make_sender

        dep, rank = config.deployment_id, config.rank
        self.parser = parser
        self.recv_from_rank = context.socket(zmq.PULL)
        self.recv_from_rank.setsockopt(zmq.LINGER, 0)
        self.recv_from_rank.bind(ipc_address(dep, rank, LocalSocket.TOKENIZER_IN))
        self.send_to_rank = context.socket(zmq.PUSH)
        self.send_to_rank.setsockopt(zmq.LINGER, 2000)
        self.send_to_rank.connect(ipc_address(dep, rank, LocalSocket.RANK_OUTPUTS))
        self.send_to_scheduler = make_sender(
            config.transport,
            ipc_address(dep, rank, LocalSocket.SCHEDULER_IN),
            dep,
            rank,
            context,
            tensor_queue,
        )
        self.running = True
        self.num_rejected = 0
        self._dispatch: dict[type, Callable[[Any], None]] = {
            m.TokenizeRequests: self.on_tokenize,
            m.AbortRequests: self.on_abort,
            m.SetLimits: self.on_limits,
            m.SetCacheKeys: self.on_cache_keys,
            m.Shutdown: self.on_shutdown,
        }

    def loop(self) -> None:
        # One input socket only: a blocking receive is the idle wait.
        while self.running:
            msg = self.recv_from_rank.recv_pyobj()
            handler = self._dispatch.get(type(msg))
            if handler is None:
                logger.error("unknown message %s from the rank main; dropped", type(msg).__name__)
                continue
            handler(msg)

    def on_tokenize(self, msg: m.TokenizeRequests) -> None:
        entries: list[EngineOutputEntry] = []
        bodies: list[bytes] = []
        for raw in msg.requests:
            try:
                request = self.parser.parse(raw)
            except InvalidRequestError as e:
                entries.append(EngineOutputEntry(raw.request_id, True, 0))
                bodies.append(error_body(f"invalid request: {e}", code=ErrorCode.INVALID_REQUEST))
                continue
            except Exception as e:
                logger.exception("request %d failed in the tokenizer", raw.request_id)
                entries.append(EngineOutputEntry(raw.request_id, True, 0))
                bodies.append(
                    error_body(f"tokenizer error: {type(e).__name__}: {e}", code=ErrorCode.INTERNAL)
                )
                continue
            self.send_to_scheduler.send(request)
        if entries:
            self.num_rejected += len(entries)
            self.send_to_rank.send_pyobj(m.RankOutputs(tuple(entries), tuple(bodies)))

    def on_abort(self, msg: m.AbortRequests) -> None:
        self.send_to_scheduler.send(msg)

    def on_limits(self, msg: m.SetLimits) -> None:
        self.parser.max_prompt_len = msg.max_prompt_len

    def on_cache_keys(self, msg: m.SetCacheKeys) -> None:
        parser = self.parser
        if not msg.enabled:
            parser.positions = None
        elif parser.positions is None:
            parser.positions = PositionMapper(parser.tokenizer, parser.add_special_tokens)

    def on_shutdown(self, msg: m.Shutdown) -> None:
        self.running = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send_to_scheduler.close()
        self.recv_from_rank.close()
        self.send_to_rank.close()


def build_parser(config: RankConfig) -> RequestParser:
    from dpinfer.runner.registry import load_tokenizer, resolve_model

    spec = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model)
    vocab = min(v for v in (spec.vocab_size, len(tokenizer)) if v > 0)
    return RequestParser(
        tokenizer=tokenizer,
        model_name=config.model.model,
        vocab_size=vocab,
        max_prompt_len=max(1, spec.context_len - 1),
        add_special_tokens=not appends_eos(tokenizer),
        mm_processor=build_mm_processor(config, spec, tokenizer),
        max_token_bytes=max_token_bytes(tokenizer),
    )


def build_mm_processor(
    config: RankConfig, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase
) -> MultimodalProcessor | None:
    """The multimodal seam: an image adapter for vision-language models, ``None`` for text-only
    models (they reject ``images`` with a clear error)."""
    if not spec.multimodal:
        return None
    from dpinfer.tokenizer.images import ImageProcessorAdapter

    return ImageProcessorAdapter(config.model, tokenizer=tokenizer)


def run_tokenizer_process(
    config: RankConfig, report_ready: ReportReady, tensor_queue: TensorQueue | None = None
) -> None:
    """Child entry: build -> report ready -> loop -> close."""
    context = zmq.Context()
    proc = TokenizerProcess(config, build_parser(config), context, tensor_queue)
    try:
        report_ready({"add_special_tokens": proc.parser.add_special_tokens})
        proc.loop()
    finally:
        proc.close()
        context.term()
