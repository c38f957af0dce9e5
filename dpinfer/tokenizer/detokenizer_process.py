"""DetokenizerProcess: scheduler token batches -> wire-ready text outputs for the rank main.

Sockets (all ``ipc://``, names from ``engine.messages``):

- ``recv_from_scheduler`` (PULL, binds ``detokenizer-in``): ``SchedulerBatch`` from the
  scheduler; ``Shutdown`` from the rank main.
- ``send_to_rank`` (PUSH, connects ``rank-outputs``): one ``RankOutputs`` per scheduler
  batch (``OutputBody`` bytes + ``EngineOutputEntry``), control results after the outputs
  they follow, and the scheduler's latest load.

The text work is ``OutputBuilder`` (incremental, UTF-8 safe, stop-string hold-back).
"""

from __future__ import annotations

from typing import Any

import zmq

from dpinfer.config import LocalSocket, RankConfig, ipc_address
from dpinfer.log import get_logger
from dpinfer.protocol import local as m
from dpinfer.tokenizer.fast_decode import make_decode
from dpinfer.tokenizer.output_builder import OutputBuilder

logger = get_logger(__name__)


class DetokenizerProcess:
    def __init__(self, config: RankConfig, builder: OutputBuilder, context: zmq.Context) -> None:
        dep, rank = config.deployment_id, config.rank
        self.builder = builder
        self.recv_from_scheduler = context.socket(zmq.PULL)
        self.recv_from_scheduler.setsockopt(zmq.LINGER, 0)
        self.recv_from_scheduler.bind(ipc_address(dep, rank, LocalSocket.DETOKENIZER_IN))
        self.send_to_rank = context.socket(zmq.PUSH)
        self.send_to_rank.setsockopt(zmq.LINGER, 2000)
        self.send_to_rank.connect(ipc_address(dep, rank, LocalSocket.RANK_OUTPUTS))
        self.running = True

    def loop(self) -> None:
        while self.running:
            msg = self.recv_from_scheduler.recv_pyobj()
            if isinstance(msg, m.SchedulerBatch):
                self.on_batch(msg)
            elif isinstance(msg, m.Shutdown):
                self.running = False
            else:
                logger.error("unknown message %s; dropped", type(msg).__name__)

    def on_batch(self, batch: m.SchedulerBatch) -> None:
        try:
            out = self.builder.process(batch)
        except Exception:
            logger.exception("detokenization failed for a batch")
            out = _failed_batch(self.builder, batch)
        if out.entries or out.control_acks or out.load is not None or out.cache_events is not None:
            self.send_to_rank.send_pyobj(out)

    def close(self) -> None:
        self.recv_from_scheduler.close()
        self.send_to_rank.close()


def _failed_batch(builder: OutputBuilder, batch: m.SchedulerBatch) -> m.RankOutputs:
    """Error finals for the finished requests of a batch that could not be detokenized."""
    from dpinfer.protocol import EngineOutputEntry, ErrorCode, error_body

    finished = [o for o in batch.outputs if o.finished]
    for o in finished:
        builder.drop(o.request_id)
    entries = tuple(EngineOutputEntry(o.request_id, True, 0) for o in finished)
    bodies = tuple(error_body("detokenization failed", code=ErrorCode.INTERNAL) for _ in finished)
    return m.RankOutputs(entries, bodies, batch.control_acks, batch.load, batch.metrics, batch.cache_events)


def run_detokenizer_process(config: RankConfig, report_ready: Any) -> None:
    """Child entry: build -> report ready -> loop -> close."""
    from dpinfer.runner.registry import load_tokenizer

    builder = OutputBuilder(make_decode(load_tokenizer(config.model)))
    context = zmq.Context()
    proc = DetokenizerProcess(config, builder, context)
    try:
        report_ready({})
        proc.loop()
    finally:
        proc.close()
        context.term()
