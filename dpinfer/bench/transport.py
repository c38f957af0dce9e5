"""``dpinfer bench transport``: moving one tensor to another local process, every method in one run.

Each case sends a tensor of ``size`` bytes to a receiver in a spawned process and waits for
its acknowledgement before sending the next (stop-and-wait), so the figure includes the ack
round trip. The receiver acks once it holds a usable tensor: it checks the tensor's shape and
a per-iteration marker in its first and last element (so a stale slot would be caught), then
drops it (which frees an ``shm`` slot) and acks.

Every case runs ``--rounds`` times, interleaved with the others; each transfer (and each
memcpy) is timed on its own and a case reports size / median time, so a burst of load from
another process on a shared host moves a few samples, not the figure.

Methods: ``memcpy`` (in-process copy into a pre-allocated tensor: the limit), ``pickle_zmq``
(the ``zmq`` channel), ``shm`` (the shared-memory region; the receiver gets a view of the
slot, no copy), ``tensor_queue`` (torch.multiprocessing queue), and with CUDA ``cuda_ipc``,
``cuda_ipc_pool``, ``default_gpu`` (a GPU source through each tensor-transport mode).
``ratio_vs_memcpy`` divides by the CPU ``memcpy`` figure of the same size.

``--leak-transfers N`` (with CUDA) then sends N more 1 MiB GPU tensors through
``cuda_ipc_pool`` and reports ``leak``: the sender's allocated CUDA memory and the device's
free memory after the first 100 transfers and after the last (the pool's workspace is
allocated once, so both must stay where they were; ``ok`` says they did).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import click

from dpinfer.bench.report import Column, emit, json_option, machine_info, render_table

CPU_METHODS = ("pickle_zmq", "shm", "tensor_queue")
GPU_METHODS = ("cuda_ipc", "cuda_ipc_pool", "default_gpu")
ALL_METHODS = ("memcpy", *CPU_METHODS, *GPU_METHODS)
MiB = 1 << 20
ACK_TIMEOUT_S = 60.0
LEAK_SETTLE = 100
"""Transfers before the leak check's first reading (pool, contexts and caches warmed)."""
LEAK_TOLERANCE_BYTES = 2 * MiB
"""Device free memory may move this much (driver bookkeeping), never by transfers."""


def _transport_config(method: str, max_size: int) -> Any:
    from dpinfer.config import TensorTransportMode, TransportConfig, TransportMode

    region = max(64 * MiB, 2 * max_size + MiB)
    if method == "pickle_zmq":
        return TransportConfig(transport=TransportMode.ZMQ)
    if method == "tensor_queue":
        return TransportConfig(transport=TransportMode.TENSOR_QUEUE)
    tensor_transport = {
        "cuda_ipc": TensorTransportMode.CUDA_IPC,
        "cuda_ipc_pool": TensorTransportMode.CUDA_IPC_POOL,
    }.get(method, TensorTransportMode.DEFAULT)
    return TransportConfig(
        transport=TransportMode.SHM,
        tensor_transport=tensor_transport,
        shm_region_bytes=region,
        cuda_pool_bytes=region,
    )


def auto_iters(size_bytes: int) -> int:
    """About 256 MiB per case and round, between 4 and 100 transfers."""
    return max(4, min(100, (256 * MiB) // size_bytes))


# ---------------------------------------------------------------------------- receiver process


def peer_main(conn: Any, deployment_id: str, tensor_queue: Any, threads: int) -> None:
    """The receiving process: for each ``("run", method, config, plan)`` command, receive and ack."""
    import torch
    import zmq

    from dpinfer.config import ipc_address
    from dpinfer.transport import make_receiver

    torch.set_num_threads(threads)
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 0)
    ack.connect(ipc_address(deployment_id, 0, "bench-ack"))
    conn.send("up")
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        _, method, config, plan = command
        address = ipc_address(deployment_id, 0, f"bench-{method}")
        receiver = make_receiver(config, address, deployment_id, 0, ctx, tensor_queue=tensor_queue)
        conn.send("ready")
        try:
            for numel, count in plan:
                for _ in range(count):
                    msg = _recv_one(receiver)
                    x, i = msg["x"], msg["i"]
                    ok = x.shape == (numel,) and x[0].item() == i and x[-1].item() == i
                    del msg, x  # frees the shm slot before the ack
                    ack.send_pyobj((i, ok))
        finally:
            receiver.close()
        conn.send("done")
    ack.close()
    ctx.term()


def _recv_one(receiver: Any) -> Any:
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while time.monotonic() < deadline:
        if receiver.socket.poll(100):
            got = receiver.recv_ready()
            if got:
                assert len(got) == 1, "stop-and-wait: one message at a time"
                return got[0]
    raise TimeoutError("no message within the benchmark deadline")


# ---------------------------------------------------------------------------- sender side


def bench_memcpy(size_bytes: int, iters: int) -> list[float]:
    """Seconds of each in-process copy into a pre-allocated tensor (after a warm-up)."""
    import torch

    src = torch.randn(size_bytes // 4)
    dst = torch.empty_like(src)
    for _ in range(_warmup(iters)):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


def bench_channel(
    method: str,
    sizes: list[int],
    iters: int,
    peer: Any,
    ack: Any,
    dep: str,
    tensor_queue: Any,
    after_ack: Callable[[int], None] | None = None,
) -> dict[int, list[float]]:
    """Seconds of each timed transfer (send until ack) per size, for one channel method;
    ``after_ack(i)`` runs after each acknowledged transfer (not timed)."""
    import torch

    from dpinfer.config import ipc_address
    from dpinfer.transport import make_sender

    device = "cuda" if method in GPU_METHODS else "cpu"
    plan = [(size // 4, _warmup(n) + n) for size in sizes for n in [iters or auto_iters(size)]]
    config = _transport_config(method, max(sizes))
    peer.send(("run", method, config, plan))
    if not peer.poll(ACK_TIMEOUT_S) or peer.recv() != "ready":
        raise click.ClickException(f"{method}: the receiver did not start")
    address = ipc_address(dep, 0, f"bench-{method}")
    sender = make_sender(config, address, dep, 0, tensor_queue=tensor_queue)
    results: dict[int, list[float]] = {}
    try:
        for size, (numel, count) in zip(sizes, plan, strict=True):
            src = torch.randn(numel, device=device)
            warmup = count - (iters or auto_iters(size))
            times = results[size] = []
            for i in range(count):
                src[0] = src[-1] = i
                t0 = time.perf_counter()
                sender.send({"i": i, "x": src})
                if not ack.poll(int(ACK_TIMEOUT_S * 1000)):
                    raise click.ClickException(f"{method}: no ack within {ACK_TIMEOUT_S}s")
                got, ok = ack.recv_pyobj()
                if got != i or not ok:
                    raise click.ClickException(f"{method}: receiver got wrong data at iteration {i}")
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                if after_ack is not None:
                    after_ack(i)
    finally:
        sender.close()
    if not peer.poll(ACK_TIMEOUT_S) or peer.recv() != "done":
        raise click.ClickException(f"{method}: the receiver did not finish")
    return results


def _warmup(iters: int) -> int:
    return max(2, iters // 10)


def leak_check(transfers: int, peer: Any, ack: Any, dep: str, tensor_queue: Any) -> dict[str, Any]:
    """``transfers`` 1 MiB GPU tensors through ``cuda_ipc_pool``: does GPU memory stay put?"""
    import torch

    readings: dict[str, tuple[int, int]] = {}
    count = _warmup(transfers) + transfers  # bench_channel's warm-up transfers come first
    last = count - 1

    def probe(i: int) -> None:
        if i in (LEAK_SETTLE, last):
            torch.cuda.synchronize()
            free, _total = torch.cuda.mem_get_info()
            readings["first" if i == LEAK_SETTLE else "last"] = (torch.cuda.memory_allocated(), free)

    bench_channel("cuda_ipc_pool", [MiB], transfers, peer, ack, dep, tensor_queue, after_ack=probe)
    (alloc0, free0), (alloc1, free1) = readings["first"], readings["last"]
    return {
        "method": "cuda_ipc_pool",
        "transfers": count,
        "size_bytes": MiB,
        "allocated_delta_bytes": alloc1 - alloc0,
        "device_free_delta_bytes": free1 - free0,
        "ok": alloc1 == alloc0 and abs(free1 - free0) <= LEAK_TOLERANCE_BYTES,
    }


def run_bench(
    sizes_mib: list[float],
    iters: int,
    methods: list[str],
    threads: int = 1,
    rounds: int = 3,
    leak_transfers: int = 0,
) -> dict[str, Any]:
    """Measure every method ``rounds`` times, interleaved; GB/s = size / median transfer time.

    Every method is timed per transfer and summarised by the median over all rounds, so one
    burst of load from another process (the host is shared) cannot decide a ratio.
    """
    import torch
    import zmq

    from dpinfer.config import TransportConfig, TransportMode, ipc_address, new_deployment_id
    from dpinfer.transport import cleanup_stale_segments, make_tensor_queue
    from dpinfer.transport.channel import ipc_path_identity, remove_ipc_path

    torch.set_num_threads(threads)
    sizes = [max(4, int(s * MiB) // 4 * 4) for s in sizes_mib]
    cuda = torch.cuda.is_available()
    notes = []
    if not cuda and any(m in GPU_METHODS for m in methods):
        notes.append(f"skipped {', '.join(m for m in methods if m in GPU_METHODS)}: no CUDA device")
        methods = [m for m in methods if m not in GPU_METHODS]
    if leak_transfers and not cuda:
        notes.append("skipped the leak check: no CUDA device")
    channel_methods = [m for m in methods if m != "memcpy"]
    leak: dict[str, Any] | None = None
    samples: dict[tuple[str, int], list[float]] = {}

    def keep(method: str, results: dict[int, list[float]]) -> None:
        for size, times in results.items():
            samples.setdefault((method, size), []).extend(times)

    dep = new_deployment_id()
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack.bind(ipc_address(dep, 0, "bench-ack"))
    ack_file = ipc_path_identity(ipc_address(dep, 0, "bench-ack"))
    tensor_queue = make_tensor_queue(TransportConfig(transport=TransportMode.TENSOR_QUEUE))
    spawn = mp.get_context("spawn")
    peer, child = spawn.Pipe()
    proc = spawn.Process(target=peer_main, args=(child, dep, tensor_queue, threads), daemon=True)
    proc.start()
    try:
        if not peer.poll(ACK_TIMEOUT_S) or peer.recv() != "up":
            raise click.ClickException("the receiver process did not start")
        for _ in range(rounds):
            keep("memcpy", {size: bench_memcpy(size, iters or auto_iters(size)) for size in sizes})
            for method in channel_methods:
                keep(method, bench_channel(method, sizes, iters, peer, ack, dep, tensor_queue))
        if leak_transfers and cuda:
            leak = leak_check(leak_transfers, peer, ack, dep, tensor_queue)
        peer.send(("stop",))
        proc.join(ACK_TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        ack.close()
        ctx.term()
        remove_ipc_path(*ack_file)
        cleanup_stale_segments(dep)
    gbps = {key: key[1] / statistics.median(times) / 1e9 for key, times in samples.items()}
    cases = [
        {
            "method": method,
            "size_bytes": size,
            "gb_per_s": round(gbps[method, size], 3),
            "ratio_vs_memcpy": round(gbps[method, size] / gbps["memcpy", size], 3),
        }
        for method in ["memcpy", *channel_methods]
        for size in sizes
    ]
    return {
        "cases": cases,
        "iters": iters or "auto",
        "rounds": rounds,
        "torch_threads": threads,
        "cuda": cuda,
        "leak": leak,
        "notes": notes,
        "machine": machine_info(),
    }


def _tables(report: dict[str, Any]) -> list[Any]:
    sizes = sorted({c["size_bytes"] for c in report["cases"]})
    columns = [Column("method", "method", justify="left")]
    for size in sizes:
        label = f"{size / MiB:g} MiB"
        columns += [Column(f"g{size}", f"{label} GB/s", "{:,.2f}"), Column(f"r{size}", "x memcpy", "{:.2f}")]
    rows: dict[str, dict[str, Any]] = {}
    for case in report["cases"]:
        row = rows.setdefault(case["method"], {"method": case["method"]})
        row[f"g{case['size_bytes']}"] = case["gb_per_s"]
        row[f"r{case['size_bytes']}"] = case["ratio_vs_memcpy"]
    title = f"transport: one tensor to another process and back an ack, {report['torch_threads']} threads"
    return [render_table(title, columns, list(rows.values()))]


@click.command("transport")
@click.option("--sizes", default="1,16,64", show_default=True, help="Tensor sizes in MiB, comma-separated.")
@click.option(
    "--iters", default=0, show_default=True, help="Timed transfers per case and round (0: ~256 MiB, 4-100)."
)
@click.option(
    "--methods",
    default=",".join(ALL_METHODS),
    show_default=True,
    help="Comma-separated subset; GPU methods are skipped without CUDA.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    help="torch threads in both processes (more than the idle cores makes OpenMP copies stall).",
)
@click.option("--rounds", default=3, show_default=True, help="Interleaved rounds pooled into one median.")
@click.option(
    "--leak-transfers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="With CUDA: this many more cuda_ipc_pool transfers, checking GPU memory stays put (0: off).",
)
@json_option
def command(
    sizes: str, iters: int, methods: str, threads: int, rounds: int, leak_transfers: int, as_json: bool
) -> None:
    """Tensor transport inside a rank: throughput to a usable tensor in another process."""
    try:
        sizes_mib = [float(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"--sizes must be numbers in MiB, got {sizes!r}") from None
    if not sizes_mib or any(s <= 0 for s in sizes_mib):
        raise click.BadParameter("--sizes needs at least one positive size")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(ALL_METHODS))
    if unknown:
        raise click.BadParameter(f"--methods: unknown {unknown}; valid: {', '.join(ALL_METHODS)}")
    if iters < 0 or threads < 1 or rounds < 1:
        raise click.BadParameter("--iters must be >= 0, --threads and --rounds >= 1")
    if 0 < leak_transfers <= LEAK_SETTLE:
        raise click.BadParameter(f"--leak-transfers must be more than {LEAK_SETTLE} (or 0)")
    report = run_bench(sizes_mib, iters, chosen, threads, rounds, leak_transfers)
    notes = [
        *report["notes"],
        "stop-and-wait, one ack per transfer; size / median transfer time; ratio = GB/s / CPU memcpy GB/s",
    ]
    if report["leak"] is not None:
        leak = report["leak"]
        notes.append(
            f"leak check ({leak['transfers']} x 1 MiB, cuda_ipc_pool): allocated "
            f"{leak['allocated_delta_bytes']:+d} B, device free {leak['device_free_delta_bytes']:+d} B "
            f"-> {'ok' if leak['ok'] else 'LEAK'}"
        )
    emit(report, as_json, _tables, notes)
