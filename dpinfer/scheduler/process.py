"""SchedulerProcess: the shell around ``Scheduler`` -- inputs in, steps, token outputs out.

Sockets (all ``ipc://``, names from ``dpinfer.protocol.local``):

- ``recv_from_tokenizer`` (``transport.channel`` receiver, binds ``scheduler-in``):
  ``TokenizedRequest`` and ``AbortRequests`` in one ordered stream.
- ``recv_control`` (PULL, binds ``scheduler-control``): ``ControlCommand`` and ``Shutdown``
  from the rank main.
- ``send_to_detokenizer`` (PUSH, connects ``detokenizer-in``): one ``SchedulerBatch`` per
  loop iteration holding the new requests' metas, every output of the step, control results
  (after the outputs they follow) and, at most every ``LOAD_INTERVAL_S``, the load and the
  request metrics (``RankMetrics``, cumulative) together.

Loop: drain every input -> step while there is work (and the state allows it) -> send one
batch -> when idle, ``IdleSleeper`` blocks on every input socket at once (never a busy loop,
never a fixed long wait). The scheduler applies lifecycle signals itself and acknowledges
them through the detokenizer, so an acknowledgement never overtakes earlier outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from dpinfer import protocol
from dpinfer.config import LocalSocket, RankConfig, ipc_address
from dpinfer.log import get_logger
from dpinfer.protocol import EngineState, FinishReason, Signal, next_state
from dpinfer.protocol import local as m
from dpinfer.protocol.messages import RankMetrics

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from dpinfer.scheduler.scheduler import Scheduler
    from dpinfer.transport.channel import RequestReceiver as Receiver
    from dpinfer.transport.tensor_queue import TensorIpcData

logger = get_logger(__name__)

_ORDER = (EngineState.RUNNING, EngineState.PAUSED, EngineState.SUSPENDED)
"""The lifecycle states a ``ReachState`` walks between, in PAUSE/SUSPEND order."""

LOAD_INTERVAL_S = 0.1
"""Most frequent load and metrics report while busy; an idle scheduler reports a change at once."""


class IdleSleeper:
    """Block until any of the scheduler's inputs is readable (or ``timeout_s`` passes).

    Register EVERY socket the scheduler reads -- the request channel and the control socket
    -- so no input ever waits for a timeout to be noticed.
    """

    def __init__(self, sockets: Sequence[zmq.Socket | int]) -> None:
        self.poller = zmq.Poller()
        for sock in sockets:
            self.poller.register(sock, zmq.POLLIN)

    def sleep(self, timeout_s: float | None = None) -> bool:
        """Return True when an input is readable, False on timeout."""
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        return bool(self.poller.poll(timeout_ms))


class SchedulerProcess:
    """Drives one ``Scheduler``; see the module docstring for the sockets and the loop."""

    def __init__(
        self,
        scheduler: Scheduler,
        receiver: Receiver,
        recv_control: zmq.Socket,
        send_to_detokenizer: zmq.Socket,
        rank: int = 0,
    ):
        self.scheduler = scheduler
        self.receiver = receiver
        self.recv_control = recv_control
        self.send_to_detokenizer = send_to_detokenizer
        self.rank = rank
        self.sleeper = IdleSleeper([receiver.socket, recv_control])
        self.running = True
        self._metas: list[m.RequestMeta] = []
        self._outputs: list[m.SchedulerOutput] = []
        self._acks: list[protocol.ControlAck] = []
        self._last_report: tuple[protocol.LoadStats, RankMetrics] | None = None
        self._last_load_at = 0.0
        self._dispatch: dict[type, Callable[[Any], None]] = {
            m.AbortRequests: self.on_abort,
            protocol.EngineControl: self.on_control,
            m.ReachState: self.on_reach_state,
            m.Shutdown: self.on_shutdown,
        }

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        while self.running:
            self.recv_inputs()
            busy = self.can_step()
            if busy:
                self._outputs.extend(self.scheduler.step())
            self.flush(idle=not busy)
            if self.running and not busy and not self.can_step():
                self.sleeper.sleep()

    def can_step(self) -> bool:
        # Paused and suspended schedulers keep their queues but must not spin on them.
        state = self.scheduler.state
        return state in (EngineState.RUNNING, EngineState.STOPPED) and bool(self.scheduler.has_work)

    def recv_inputs(self) -> None:
        for obj in self.receiver.recv_ready():
            self.dispatch(obj)
        while True:
            try:
                obj = self.recv_control.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.dispatch(obj)

    def dispatch(self, obj: object) -> None:
        if isinstance(obj, m.TokenizedRequest):
            self.on_request(obj)
            return
        handler = self._dispatch.get(type(obj))
        if handler is None:
            logger.error("unknown message %s; dropped", type(obj).__name__)
            return
        handler(obj)

    def flush(self, idle: bool) -> None:
        """Send what this iteration produced as one batch (plus the load and metrics when due)."""
        report = self._due_report(idle)
        events = self.scheduler.kv.cache_keys.take()
        if not (self._metas or self._outputs or self._acks or report or events):
            return
        load, metrics = report or (None, None)
        batch = m.SchedulerBatch(
            tuple(self._metas), tuple(self._outputs), tuple(self._acks), load, metrics, events
        )
        self._metas, self._outputs, self._acks = [], [], []
        self.send_to_detokenizer.send_pyobj(batch)

    def _due_report(self, idle: bool) -> tuple[protocol.LoadStats, RankMetrics] | None:
        now = time.monotonic()
        if not idle and now - self._last_load_at < LOAD_INTERVAL_S:
            return None
        report = (self.scheduler.load(), self.scheduler.metrics())
        if idle and report == self._last_report:
            return None
        self._last_report, self._last_load_at = report, now
        return report

    # ------------------------------------------------------------------ handlers

    def on_request(self, req: m.TokenizedRequest) -> None:
        sampling = req.sampling
        stop = tuple(sampling.stop) if sampling is not None else ()
        self._metas.append(
            m.RequestMeta(
                req.request_id,
                bool(req.stream),
                stop,
                tuple(req.input_ids[-8:]),
                resume_ids=req.resume_ids,
                resume_chars=req.resume_chars,
                min_tokens=sampling.min_tokens if stop else 0,
                include_stop_str=bool(stop) and sampling.include_stop_str_in_output,
            )
        )
        try:
            self._outputs.extend(self.scheduler.add_request(req))
        except Exception as e:
            logger.exception("add_request(%d) failed", req.request_id)
            self._outputs.append(
                _error_output(req.request_id, len(req.input_ids), f"{type(e).__name__}: {e}")
            )

    def on_abort(self, msg: m.AbortRequests) -> None:
        for rid in msg.request_ids:
            self._outputs.extend(self.scheduler.abort_request(rid))

    def on_shutdown(self, msg: m.Shutdown) -> None:
        self.running = False

    def on_control(self, cmd: protocol.EngineControl) -> None:
        signal, ok, error = cmd.signal, True, ""
        try:
            if signal in (Signal.STOP, Signal.SHUTDOWN):
                self._stop(bool(cmd.args.get("drain", True)), str(cmd.args.get("reason", "rank stopped")))
            else:
                target = next_state(self.scheduler.state, signal)
                self._apply(signal, cmd.args)
                assert self.scheduler.state is target, (signal, self.scheduler.state, target)
        except Exception as e:  # noqa: BLE001 - a failed signal is acknowledged with its error
            logger.warning("control %s failed: %s", signal.value, e)
            ok, error = False, str(e)
        ack = protocol.RankAck(self.rank, ok, self.scheduler.state, error)
        self._acks.append(protocol.ControlAck(cmd.control_id, signal, ack))

    def on_reach_state(self, msg: m.ReachState) -> None:
        if self.scheduler.state not in _ORDER or msg.state not in _ORDER:
            logger.warning("cannot go from %s to %s; ignored", self.scheduler.state.value, msg.state.value)
            return
        here, there = _ORDER.index(self.scheduler.state), _ORDER.index(msg.state)
        down, up = (Signal.PAUSE, Signal.SUSPEND), (Signal.UNPAUSE, Signal.RESUME)
        steps = down[here:there] if there > here else tuple(reversed(up[there:here]))
        for signal in steps:
            self.on_control(protocol.EngineControl(m.INTERNAL_CONTROL_ID, signal, {}))

    def _apply(self, signal: Signal, args: dict[str, object]) -> None:
        if signal is Signal.PAUSE:
            self.scheduler.pause()
        elif signal is Signal.UNPAUSE:
            self.scheduler.unpause()
        elif signal is Signal.SUSPEND:
            self.scheduler.suspend()
        elif signal is Signal.RESUME:
            self.scheduler.resume()
        elif signal is Signal.UPDATE_WEIGHTS:
            path = args.get("path")
            if not isinstance(path, str) or not path:
                raise ValueError("update_weights needs args.path: a local model directory")
            self.scheduler.update_weights(path)

    def _stop(self, drain: bool, reason: str) -> None:
        """Drain: run to completion (leaving pause/suspend); otherwise abort everything now."""
        if drain:
            if self.scheduler.state is EngineState.SUSPENDED:
                self.scheduler.resume()
            if self.scheduler.state is EngineState.PAUSED:
                self.scheduler.unpause()
        else:
            self._outputs.extend(self.scheduler.abort_all(reason) or ())
        self.scheduler.state = EngineState.STOPPED


def _error_output(request_id: int, prompt_len: int, error: str) -> m.SchedulerOutput:
    return m.SchedulerOutput(
        request_id=request_id,
        new_token_ids=[],
        finished=True,
        finish_reason=FinishReason.ERROR.value,
        matched_stop=None,
        error=error,
        prompt_len=prompt_len,
        cached_len=0,
    )


def run_scheduler_process(
    config: RankConfig, report_ready: m.ReportReady, tensor_queue: Queue[TensorIpcData] | None = None
) -> None:
    """Child entry: build the scheduler and sockets -> report ready -> loop -> close."""
    from dpinfer.scheduler.scheduler import Scheduler
    from dpinfer.transport.channel import make_receiver

    dep, rank = config.deployment_id, config.rank
    if config.num_threads > 0:
        import torch

        torch.set_num_threads(config.num_threads)  # the launcher's per-rank share of the cores
    scheduler = Scheduler.from_config(config.model, config.scheduler)
    context = zmq.Context()
    receiver = make_receiver(
        config.transport, ipc_address(dep, rank, LocalSocket.SCHEDULER_IN), dep, rank, context, tensor_queue
    )
    recv_control = context.socket(zmq.PULL)
    recv_control.setsockopt(zmq.LINGER, 0)
    recv_control.bind(ipc_address(dep, rank, LocalSocket.SCHEDULER_CONTROL))
    send_to_detokenizer = context.socket(zmq.PUSH)
    send_to_detokenizer.setsockopt(zmq.LINGER, 2000)
    send_to_detokenizer.connect(ipc_address(dep, rank, LocalSocket.DETOKENIZER_IN))
    try:
        load = scheduler.load()
        report_ready(
            {
                "max_context_len": int(scheduler.max_context_len),
                "kv_capacity_tokens": int(load.kv_capacity_tokens),
            }
        )
        SchedulerProcess(scheduler, receiver, recv_control, send_to_detokenizer, rank).loop()
    finally:
        receiver.close()
        recv_control.close()
        send_to_detokenizer.close()
        context.term()
