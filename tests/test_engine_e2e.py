"""One real engine rank (tiny-llama) behind a real coordinator, driven by a raw protocol client.

The rank is started once for the module (``python -m dpinfer.launcher.worker --no-supervise``); the last test
stops it with STOP and checks that it and its children exit. Helpers here are shared with
``test_engine_e2e_failure.py``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wire import Result, WireClient

from dpinfer import protocol
from dpinfer.config import CoordinatorConfig, ModelConfig
from dpinfer.coordinator.process import CoordinatorHandle, start_coordinator

START_TIMEOUT_S = 180.0
KV_CACHE_BYTES = 8 << 20  # 2048 tokens of tiny-llama KV
CHILD_COMMS = ("dpinfer-tok", "dpinfer-sched", "dpinfer-detok")
GREEDY = {"temperature": 0.0}

_ids = itertools.count(100_000)


# ---------------------------------------------------------------------------- helpers


def child_pids(pid: int) -> dict[str, int]:
    """The rank's children by ``/proc/<pid>/comm`` name (only the dpinfer ones)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and comm in CHILD_COMMS:
            found[comm] = int(entry.name)
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class RankProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_rank(
    address: str, workdir: Path, rank: int = 0, model: str = "tiny-llama", *extra: str
) -> RankProcess:
    log_path = workdir / f"rank{rank}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", DPINFER_IPC_DIR=str(workdir))
    env.setdefault("DPINFER_LOG_LEVEL", "INFO")
    cmd = [sys.executable, "-m", "dpinfer.launcher.worker", "--no-supervise", "--threads-per-rank", "1",
           "--coordinator", address, "--rank", str(rank),
           "--model", model, "--device", "cpu", "--kv-cache-bytes", str(KV_CACHE_BYTES), *extra]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return RankProcess(proc, log_path)


def wait_rank_live(client: WireClient, rank: RankProcess, rank_id: int = 0) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = client.status()
        if any(r["rank"] == rank_id and r["alive"] for r in status["ranks"]):
            return
        assert rank.proc.poll() is None, f"rank exited with {rank.proc.returncode}:\n{rank.log()}"
        assert time.monotonic() < deadline, f"rank not live after {START_TIMEOUT_S} s:\n{rank.log()}"
        client.pump(0.2)


def submit_bodies(client: WireClient, bodies: list[Any], stream: bool = False) -> list[int]:
    """Submit raw bodies (dicts are msgpack-packed, bytes go as they are); client request ids."""
    ids = [next(_ids) for _ in bodies]
    entries = tuple(protocol.SubmitEntry(i, protocol.NO_RANK, stream) for i in ids)
    frames = tuple(b if isinstance(b, bytes) else protocol.pack_body(b) for b in bodies)
    client.send(protocol.Submit(entries, frames))
    return ids


def generate(client: WireClient, body: dict[str, Any], stream: bool = False, timeout_s: float = 60) -> Result:
    (rid,) = submit_bodies(client, [body], stream)
    return client.wait_results([rid], timeout_s)[0]


def short_tmpdir() -> Path:
    # ipc:// paths must stay under ~107 bytes: keep the directory short.
    return Path(tempfile.mkdtemp(prefix="dpi", dir="/tmp"))


@dataclass
class Stack:
    coordinator: CoordinatorHandle
    rank: RankProcess
    client: WireClient
    workdir: Path


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = short_tmpdir()
    coordinator = start_coordinator(CoordinatorConfig(port=0))
    rank = start_rank(coordinator.address, workdir)
    client = WireClient(coordinator.address)
    try:
        wait_rank_live(client, rank)
        yield Stack(coordinator, rank, client, workdir)
    finally:
        client.close()
        rank.kill()
        coordinator.stop(timeout_s=5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from dpinfer.runner.registry import load_tokenizer

    return load_tokenizer(ModelConfig())


def decode(tokenizer: Any, ids: Any) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------- tests


def test_generate_returns_text(stack: Stack, tokenizer: Any) -> None:
    res = generate(stack.client, {"prompt": "Hello there", "sampling": {"max_new_tokens": 12, **GREEDY}})
    final = res.final
    assert final is not None and final.error is None, final
    assert final.finish_reason in ("stop", "length") and 0 < final.completion_tokens <= 12
    assert final.completion_tokens == len(final.token_ids)
    assert final.prompt_tokens == len("Hello there")
    assert final.text == decode(tokenizer, final.token_ids)
    assert res.num_finals == 1 and res.rank == 0


def test_greedy_matches_transformers_generate(stack: Stack, tokenizer: Any) -> None:
    import torch

    from dpinfer.runner.registry import load_model, resolve_model

    model = load_model(resolve_model(ModelConfig()), "cpu", "float32")
    prompts = ["The quick brown fox", "a", "Zürich is 10°C today and"]
    n = 24
    ids = submit_bodies(
        stack.client, [{"prompt": p, "sampling": {"max_new_tokens": n, **GREEDY}} for p in prompts]
    )
    results = stack.client.wait_results(ids, 60)
    for prompt, res in zip(prompts, results, strict=True):
        input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        expected = out[0, input_ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in expected:  # the engine does not return the EOS token
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert res.final is not None and list(res.final.token_ids) == expected, f"prompt {prompt!r}"
        assert res.final.text == decode(tokenizer, expected)


def test_streaming_deltas_concatenate_to_final_text(stack: Stack, tokenizer: Any) -> None:
    # High-temperature seeded sampling emits random bytes: multi-byte characters get split
    # across tokens and must be held back until complete.
    bodies = [
        {"prompt": f"ünïcödé {seed}", "sampling": {"max_new_tokens": 160, "temperature": 5.0, "seed": seed}}
        for seed in range(6)
    ]
    ids = submit_bodies(stack.client, bodies, stream=True)
    results = stack.client.wait_results(ids, 90)
    non_ascii = 0
    for res in results:
        final = res.final
        assert final is not None and final.error is None
        assert res.partials, "a streaming request gets partial outputs"
        assert res.streamed_text == final.text == decode(tokenizer, final.token_ids)
        streamed_ids = [t for p in res.partials for t in p.delta_token_ids] + list(final.delta_token_ids)
        assert streamed_ids == list(final.token_ids)
        assert all("\ufffd" not in p.delta_text for p in res.partials)
        non_ascii += sum(1 for ch in final.text if ord(ch) > 127)
    assert non_ascii > 0, "expected some multi-byte characters in 960 random bytes"


def test_chat_messages_and_stop_string(stack: Stack, tokenizer: Any) -> None:
    res = generate(
        stack.client, {"messages": [{"role": "user", "content": "hi"}], "sampling": {"max_new_tokens": 6}}
    )
    assert res.final is not None and res.final.error is None
    assert res.final.prompt_tokens == len("<|user|>hi\n<|assistant|>")
    # Pick a stop string from an unconstrained greedy run, then check it is cut out.
    free = generate(stack.client, {"prompt": "stop test", "sampling": {"max_new_tokens": 16, **GREEDY}}).final
    assert free is not None
    text = free.text
    stop = next((ch for i, ch in enumerate(text) if i > 0 and ch.isprintable() and text.index(ch) == i), None)
    if stop is None:
        pytest.skip(f"greedy output {text!r} has no usable stop-string candidate")
    body = {"prompt": "stop test", "sampling": {"max_new_tokens": 16, "stop": [stop], **GREEDY}}
    res = generate(stack.client, body, stream=True)
    assert res.final is not None and res.final.finish_reason == "stop"
    assert res.final.text == text[: text.index(stop)] == res.streamed_text


BAD_BODIES: list[tuple[Any, str]] = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * 2100}, "accepts at most"),
    ({"prompt": "a", "sampling": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
    ({"prompt": "a", "sampling": {"temperature": -1.0}}, "temperature must be >= 0"),
    ({"prompt": "a", "sampling": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    ({"prompt": "a", "sampling": {"top_k": -2}}, "top_k must be >= 0"),
    ({"prompt": "a", "colour": "red"}, "unknown request field(s): colour"),
    ({"prompt": 7}, "prompt must be a string or a list of token ids"),
    ({"prompt": [3, 99999]}, "out of vocabulary"),
    (b"\xc1\xc1\xc1", "undecodable request body"),
    ({"prompt": "a", "images": [b"\x89PNG...."]}, "does not accept 'images'"),
]


def test_each_bad_input_gets_an_error_and_the_rank_keeps_serving(stack: Stack) -> None:
    ids = submit_bodies(
        stack.client, [b for b, _ in BAD_BODIES] + [{"prompt": "ok", "sampling": {"max_new_tokens": 3}}]
    )
    results = stack.client.wait_results(ids, 60)
    for (body, expected), res in zip(BAD_BODIES, results, strict=False):
        final = res.final
        assert final is not None and final.finish_reason == "error", (body, final)
        assert final.error is not None and expected in final.error, (body, final.error)
        assert res.num_finals == 1
    good = results[-1].final
    assert good is not None and good.error is None and good.completion_tokens > 0


def test_abort_running_request(stack: Stack) -> None:
    body = {"prompt": "abort me", "sampling": {"max_new_tokens": 1500, "ignore_eos": True, **GREEDY}}
    (rid,) = submit_bodies(stack.client, [body], stream=True)
    stack.client.wait_for(lambda: bool(stack.client.results.get(rid) and stack.client.results[rid].partials),
                          30, "a first partial")  # fmt: skip
    stack.client.abort([rid])
    (res,) = stack.client.wait_results([rid], 30)
    assert res.final is not None and res.final.finish_reason == "abort"
    assert res.final.completion_tokens < 1500 and res.num_finals == 1


def test_lifecycle_with_requests_in_flight(stack: Stack) -> None:
    """PAUSE keeps in-flight and new requests; SUSPEND/RESUME recompute them; weights swap while paused."""
    from dpinfer.runner.registry import resolve_model

    c = stack.client
    body = {"prompt": "pause me", "sampling": {"max_new_tokens": 400, "ignore_eos": True, **GREEDY}}
    (a,) = submit_bodies(c, [body], stream=True)
    c.wait_for(lambda: bool(c.results.get(a) and c.results[a].partials), 30, "a first partial")
    reply = c.control("pause")
    assert reply.ok and reply.state == "paused", reply
    c.pump(0.3)  # let outputs already on their way arrive
    seen = len(c.results[a].partials)
    (b,) = submit_bodies(c, [{"prompt": "queued while paused", "sampling": {"max_new_tokens": 5}}])
    c.pump(0.5)
    assert len(c.results[a].partials) == seen, "a paused rank must not generate"
    assert b not in c.results, "a request submitted while paused waits"
    for signal, state in (("suspend", "suspended"), ("resume", "paused")):
        reply = c.control(signal)
        assert reply.ok and reply.state == state, reply
    reply = c.control("update_weights", {"path": resolve_model(ModelConfig()).path}, timeout_s=60)
    assert reply.ok and reply.state == "paused", reply
    reply = c.control("unpause")
    assert reply.ok and reply.state == "running", reply
    ra, rb = c.wait_results([a, b], 60)
    assert ra.final is not None and ra.final.completion_tokens == 400 and ra.streamed_text == ra.final.text
    assert rb.final is not None and rb.final.error is None
    # The interrupted, recomputed request generated exactly what an uninterrupted one does.
    again = generate(c, body)
    assert again.final is not None and again.final.token_ids == ra.final.token_ids


def test_sdk_client_generate_and_stream(stack: Stack) -> None:
    from dpinfer import InferenceClient, SamplingParams

    with InferenceClient(stack.coordinator.address, timeout_s=30, request_timeout_s=60) as client:
        (res,) = client.generate("via the SDK", SamplingParams(max_new_tokens=10, temperature=0.0))
        assert res.ok and res.completion_tokens == len(res.token_ids) > 0 and res.rank == 0
        deltas = list(
            client.generate_stream("via the SDK", SamplingParams(max_new_tokens=10, temperature=0.0))
        )
        assert deltas[-1].finished and deltas[-1].result is not None
        assert "".join(d.text for d in deltas) == deltas[-1].result.text == res.text
        assert deltas[-1].result.token_ids == res.token_ids


def test_stop_drains_then_rank_and_children_exit(stack: Stack) -> None:
    c = stack.client
    children = child_pids(stack.rank.proc.pid)
    assert set(children) == set(CHILD_COMMS), f"children by /proc comm: {children}"
    short = {"prompt": "short", "sampling": {"max_new_tokens": 20, **GREEDY}}
    long = {"prompt": "long", "sampling": {"max_new_tokens": 1900, "ignore_eos": True, **GREEDY}}
    s, lg = submit_bodies(c, [short, long], stream=True)
    c.wait_for(lambda: bool(c.results.get(lg) and c.results[lg].partials), 30, "the long request running")
    reply = c.control("stop", {"drain": True, "deadline_s": 1.0}, timeout_s=30)
    assert reply.ok and reply.state == "stopped", reply
    rs, rl = c.wait_results([s, lg], 10)
    assert rs.final is not None and rs.final.finish_reason == "length", "drained within the deadline"
    assert rl.final is not None and rl.final.finish_reason == "abort", "aborted at the deadline"
    assert rs.num_finals == rl.num_finals == 1
    assert stack.rank.proc.wait(timeout=30) == 0, stack.rank.log()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in children.values()) and time.monotonic() < deadline:
        c.pump(0.1)
    assert not any(pid_alive(p) for p in children.values()), f"children left behind: {children}"
    assert not [p for p in stack.workdir.iterdir() if p.name.startswith("dpinfer-")], "ipc files left behind"
