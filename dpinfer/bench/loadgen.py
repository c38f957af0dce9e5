"""The benchmarks' load generator (a raw DEALER speaking the protocol, nothing in between)
and ``Target``, one system under that load with what was measured on it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TypedDict, cast

import zmq

from dpinfer import protocol
from dpinfer.bench.report import latency_summary_us, process_cpu_s
from dpinfer.errors import RequestTimeoutError
from dpinfer.protocol import codec

BODY = protocol.pack_body({"prompt": "x", "sampling": {"max_new_tokens": 1}})


def keyed_bodies(groups: int = 16, variants: int = 16) -> list[tuple[bytes, bytes]]:
    """``(body, packed prefix keys)`` of ``groups x variants`` prompts: a 512-character group
    prefix then a 512-character variant (8 keys each), for ``cache_aware`` routing's load."""
    from dpinfer.protocol import prefix_keys

    out = []
    for g in range(groups):
        prefix = f"group {g:04d} " * 47  # 517 characters
        for v in range(variants):
            prompt = prefix[:512] + (f"variant {g:04d}-{v:04d} " * 24)[:512]
            request = protocol.RequestBody.from_builtins(
                {"prompt": prompt, "sampling": {"max_new_tokens": 1}}
            )
            out.append((request.to_bytes(), prefix_keys.pack(prefix_keys.body_keys(request))))
    return out


class RawLoad:
    """The load generator: one DEALER speaking the protocol with no SDK in between.

    ``via_coordinator`` picks the dialect: ``Submit``/``Outputs`` to a coordinator (after the
    ``ClientHello`` handshake), or ``Requests``/``EngineOutputs`` straight to a direct rank.
    Everything else (batching, window refill, timing) is the same code for both.
    """

    def __init__(
        self, address: str, via_coordinator: bool, timeout_s: float = 10.0, keyed: bool = False
    ) -> None:
        self.via_coordinator = via_coordinator
        self._keyed = keyed_bodies() if keyed else None
        """Bodies with shared prefixes and their keys, sent in turn (``cache_aware`` cases)."""
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self._sock.connect(address)
        self._next_id = 1
        if via_coordinator:
            self._sock.send_multipart(
                protocol.encode(protocol.ClientHello(protocol.PROTOCOL_VERSION, "bench"))
            )
            reply = protocol.decode(self._recv())
            if not isinstance(reply, protocol.HelloAck):
                raise RuntimeError(f"coordinator handshake failed: {reply}")

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def _recv(self) -> list[bytes]:
        try:
            return self._sock.recv_multipart()
        except zmq.Again:  # RCVTIMEO passed
            raise RequestTimeoutError("the benchmark target stopped answering") from None

    def _send(self, count: int) -> None:
        first = self._next_id
        self._next_id += count
        ids = range(first, first + count)
        if self._keyed is not None:
            self._send_keyed(ids)
            return
        if self.via_coordinator:
            header = codec.pack_batch(codec.KIND_SUBMIT, [(i, protocol.NO_RANK, False) for i in ids])
        else:
            header = codec.pack_batch(codec.KIND_REQUESTS, [(i, False) for i in ids])
        self._sock.send_multipart([header, *([BODY] * count)])

    def _send_keyed(self, ids: range) -> None:
        assert self._keyed is not None
        n = len(self._keyed)
        picked = [self._keyed[i % n] for i in ids]
        if self.via_coordinator:
            entries = [(i, protocol.NO_RANK, False, keys) for i, (_, keys) in zip(ids, picked, strict=True)]
            header = codec.pack_batch(codec.KIND_SUBMIT, entries)
        else:
            header = codec.pack_batch(codec.KIND_REQUESTS, [(i, False) for i in ids])
        self._sock.send_multipart([header, *(body for body, _ in picked)])

    def _finals(self, frames: list[bytes]) -> int:
        # The hot kinds' own decoders (one C call each): the load generator must stay cheap.
        kind = codec.peek_kind(frames[0])
        if kind == codec.KIND_OUTPUTS:
            entries: tuple[tuple[object, ...], ...] = codec.output_entries(frames[0], len(frames) - 1)
        elif kind == codec.KIND_ENGINE_OUTPUTS:
            entries = codec.engine_output_entries(frames[0], len(frames) - 1)
        else:
            raise RuntimeError(f"unexpected reply during the benchmark: {protocol.decode(frames)}")
        # The last body stands for the batch: a failing target fails every request alike.
        last = protocol.unpack_body(frames[-1])
        if last.get("finish_reason") != "stop":
            raise RuntimeError(f"request failed during the benchmark: {last.get('error')}")
        return sum(1 for entry in entries if entry[1])

    def _recv_finals(self) -> int:
        """Block for one message, then drain what else is queued; the number of finished requests."""
        done = self._finals(self._recv())
        sock = self._sock
        while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            done += self._finals(sock.recv_multipart())
        return done

    def latency(self, num_requests: int) -> list[float]:
        """Round-trip seconds of ``num_requests`` requests sent one at a time."""
        out = []
        clock = time.perf_counter
        for _ in range(num_requests):
            start = clock()
            self._send(1)
            while not self._recv_finals():
                pass
            out.append(clock() - start)
        return out

    def throughput(self, num_requests: int, window: int) -> float:
        """Seconds to complete ``num_requests`` with ``window`` in flight (refilled in batches)."""
        start = time.perf_counter()
        sent = min(window, num_requests)
        self._send(sent)
        done = 0
        while done < num_requests:
            finished = self._recv_finals()
            done += finished
            refill = min(finished, num_requests - sent)
            if refill:
                self._send(refill)
                sent += refill
        return time.perf_counter() - start


class TargetStats(TypedDict):
    """What ``Target.stats`` measured; CPU figures are ``None`` without a hub process."""

    req_per_s: float
    req_per_s_rounds: list[float]
    p50_us: float
    p99_us: float
    coordinator_cpu_us_per_req: float | None
    coordinator_cpu_us_per_req_c1: float | None


class Target:
    """One system under load (the direct rank or a coordinator) and what was measured on it.

    ``pid`` is the coordinator's process (its CPU clock is read around each phase), or None.
    """

    def __init__(self, load: RawLoad, pid: int | None) -> None:
        self.load = load
        self.pid = pid
        self.round_s: list[float] = []
        self.num_requests = 0
        self.cpu_s = 0.0
        self.latencies: list[float] = []
        self.latency_cpu_s = 0.0

    def _cpu(self) -> float:
        return process_cpu_s(self.pid) if self.pid else 0.0

    def throughput_round(self, requests: int, window: int) -> None:
        cpu0 = self._cpu()
        self.round_s.append(self.load.throughput(requests, window))
        self.cpu_s += self._cpu() - cpu0
        self.num_requests += requests

    def latency_round(self, requests: int) -> None:
        cpu0 = self._cpu()
        self.latencies.extend(self.load.latency(requests))
        self.latency_cpu_s += self._cpu() - cpu0

    def stats(self, requests: int) -> TargetStats:
        """Best round's throughput (the least disturbed by other load), all latency samples, mean CPU."""
        summary = latency_summary_us(self.latencies)
        per_req = self.pid is not None
        return {
            "req_per_s": round(requests / min(self.round_s), 1),
            "req_per_s_rounds": [round(requests / s, 1) for s in self.round_s],
            "p50_us": summary["p50_us"],
            "p99_us": summary["p99_us"],
            "coordinator_cpu_us_per_req": round(self.cpu_s / self.num_requests * 1e6, 2) if per_req else None,
            "coordinator_cpu_us_per_req_c1": (
                round(self.latency_cpu_s / len(self.latencies) * 1e6, 2) if per_req else None
            ),
        }


def interleave(
    targets: Sequence[Target], requests: int, window: int, latency_requests: int, rounds: int
) -> None:
    """Warm up, then alternate the targets round by round so background load hits them alike."""
    for target in targets:
        target.load.throughput(min(requests, 2000), window)
    per_round = max(1, latency_requests // rounds)
    for _ in range(rounds):
        for target in targets:
            target.throughput_round(requests, window)
        for target in targets:
            target.latency_round(per_round)
