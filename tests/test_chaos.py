"""`dpinfer chaos`: the invariant checker on synthetic records, the seeded schedule, a short real
run (exit code and JSON report), and a run interrupted during start-up that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import alive, descendants

from dpinfer.chaos.invariants import (
    check_deadlines,
    check_ended_once,
    check_greedy,
    check_leftovers,
    check_memory,
    check_no_failures,
    check_requests,
    check_streams,
)
from dpinfer.chaos.plan import RESTARTING_KINDS, FaultKind, draw_schedule, parse_faults
from dpinfer.chaos.workload import FLOOD, GREEDY, Reference, RequestRecord, RequestSpec
from dpinfer.config import ConfigError
from dpinfer.outputs import GenerationResult

SPEC = RequestSpec(GREEDY, "the prompt", 4)
REFERENCES = {SPEC: Reference("abcd", (1, 2, 3, 4))}


def _record(request_id: int = 1, *, stream: bool = False, spec: RequestSpec = SPEC) -> RequestRecord:
    return RequestRecord(spec, stream, deadline_s=30.0, client_name="c", request_id=request_id)


def _ended(
    record: RequestRecord, text: str = "abcd", token_ids: tuple[int, ...] = (1, 2, 3, 4)
) -> RequestRecord:
    record.wire_finals += 1
    record.end(GenerationResult(record.request_id, text, token_ids, "length", rank=0))
    if record.stream:
        record.streamed_text, record.streamed_token_ids = [text[:2], text[2:]], list(token_ids)
    return record


def test_clean_records_pass_every_request_check() -> None:
    records = [_ended(_record(1)), _ended(_record(2, stream=True))]
    checks = check_requests(records, REFERENCES)
    assert all(c.ok for c in checks), checks


def test_a_request_with_two_finals_fails_ended_once() -> None:
    twice = _ended(_record(1))
    twice.end(GenerationResult(1, "abcd", (1, 2, 3, 4), "length"))
    check = check_ended_once([twice, _ended(_record(2))])
    assert not check.ok and "#1 of c" in check.detail and "2 times" in check.detail, check


def test_a_second_final_on_the_wire_fails_ended_once_even_if_the_sdk_dropped_it() -> None:
    record = _ended(_record(1))
    record.wire_finals += 1
    assert not check_ended_once([record]).ok
    assert not check_ended_once([_ended(_record(2))], foreign_finals=1).ok


def test_a_missing_final_fails_ended_once_and_the_deadline() -> None:
    never = _record(7)
    assert not check_ended_once([_ended(_record(1)), never]).ok
    deadline = check_deadlines([never])
    assert not deadline.ok and "no final" in deadline.detail


def test_an_abort_nobody_asked_for_or_an_error_without_a_code_fails_ended_once() -> None:
    aborted = _record(1)
    aborted.end(GenerationResult(1, "", (), "abort", error="aborted"))
    assert not check_ended_once([aborted]).ok
    aborted.aborted_by_harness = True
    assert check_ended_once([aborted]).ok
    uncoded = _record(2)
    uncoded.end(GenerationResult(2, "", (), "error", error="boom"))
    assert not check_ended_once([uncoded]).ok


def test_a_greedy_mismatch_fails_the_reference_check() -> None:
    good, bad = _ended(_record(1)), _ended(_record(2), text="abXd", token_ids=(1, 2, 9, 4))
    check = check_greedy([good, bad], REFERENCES)
    assert not check.ok and "#2 of c" in check.detail and "token 2" in check.detail, check
    seeded = RequestSpec("sampled", "the prompt", 4, seed=5)
    references = {**REFERENCES, seeded: Reference("zz", (1, 2, 3, 4))}
    assert check_greedy([_ended(_record(3, spec=seeded), text="zz")], references).ok
    assert not check_greedy([_ended(_record(3, spec=seeded), text="zy")], references).ok


def test_a_stream_that_lost_a_token_fails_the_stream_check() -> None:
    record = _ended(_record(1, stream=True))
    record.streamed_token_ids.pop()
    assert not check_streams([record]).ok


def test_errors_fail_but_overloaded_replies_do_not() -> None:
    overloaded = _record(1, spec=RequestSpec(FLOOD, "flood", 4))
    overloaded.end_error("overloaded", "too many")
    assert check_no_failures([overloaded, _ended(_record(2))]).ok
    lost = _record(3)
    lost.end_error("connection_lost", "gone")
    check = check_no_failures([overloaded, lost])
    assert not check.ok and "connection_lost 1" in check.detail


def test_late_requests_leftovers_and_memory_fail_their_checks() -> None:
    late = _ended(_record(1))
    late.latency_s = 31.0
    assert not check_deadlines([late]).ok
    assert not check_leftovers({"processes": ["123 (python)"], "shm": [], "ipc": []}).ok
    assert check_leftovers({"processes": [], "shm": [], "ipc": []}).ok
    assert not check_memory(400 << 20, 0, 300 << 20, 256 << 20).ok
    assert not check_memory(30 << 20, 300 << 20, 300 << 20, 256 << 20).ok
    assert check_memory(30 << 20, 10 << 20, 300 << 20, 256 << 20).ok


def test_the_schedule_is_a_function_of_the_seed_and_spends_only_the_restarts_there_are() -> None:
    kinds = parse_faults("all")
    one, again, other = (draw_schedule(s, kinds, 2, 1) for s in (5, 5, 6))
    assert one == again and one != other
    kills = [f for f in one if f.kind in RESTARTING_KINDS]
    assert sorted(f.rank for f in kills) == [0, 1], kills  # one restart per rank, each spent once
    assert {f.kind for f in one} == set(FaultKind)
    assert not [f for f in draw_schedule(5, kinds, 2, 0) if f.kind in RESTARTING_KINDS]
    assert draw_schedule(5, (FaultKind.KILL_RANK,), 2, 0) == []
    with pytest.raises(ConfigError, match="kill_everything"):
        parse_faults("flood,kill_everything")


# ---------------------------------------------------------------------------- real runs

FAULTS_THAT_HOLD = "stop_rank,kill_coordinator,vanish_client,flood"
"""Every kind but the two that end a rank process: a restarted rank imports torch and loads its
model again, which takes half a minute on two loaded cores (`dpinfer chaos` runs them all)."""


def _chaos(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpinfer", "chaos", *args]


def test_a_short_chaos_run_holds_every_invariant_and_reports_json() -> None:
    done = subprocess.run(
        _chaos("--duration", "15", "--seed", "11", "--faults", FAULTS_THAT_HOLD, "--json"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.stdout.strip(), f"no report (exit {done.returncode}):\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    failed = [c for c in report["invariants"] if not c["ok"]]
    assert done.returncode == 0 and report["ok"] and not failed, json.dumps(report, indent=1)
    names = {c["name"] for c in report["invariants"]}
    for name in ("every request ended exactly once", "greedy and seeded outputs equal the reference",
                 "no request waited past its deadline", "nothing left after shutdown",
                 "hub and rank memory bounded", "vanished clients forgotten, their requests aborted",
                 "floods beyond the limits answered 'overloaded'"):  # fmt: skip
        assert name in names, names
    figures = report["figures"]
    assert set(figures["faults_injected"]) == set(FAULTS_THAT_HOLD.split(",")), report["faults"]
    assert figures["requests_by_kind"]["greedy"] > 0 and figures["requests_by_kind"]["sampled"] > 0
    assert figures["overload_replies"] >= 16 and figures["peak_hub_rss_mb"] > 0
    assert figures["coordinator_restarts"] >= 1 and figures["resubmissions"] is not None
    assert report["log_dir"] is None, "a run whose invariants held keeps no logs"


def test_an_interrupted_run_stops_everything_it_started() -> None:
    chaos = subprocess.Popen(
        _chaos("--duration", "60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 120
        while not any("dpinfer.launcher.worker" in _cmdline(p) for p in seen):
            assert chaos.poll() is None and time.monotonic() < deadline, "the ranks never started"
            seen |= descendants(chaos.pid)
            time.sleep(0.2)  # another process's children: poll /proc with a deadline
        seen |= descendants(chaos.pid)
        worker = next(_cmdline(p) for p in seen if "dpinfer.launcher.worker" in _cmdline(p)).split()
        deployment_id = worker[worker.index("--deployment-id") + 1]
        chaos.send_signal(signal.SIGINT)
        assert chaos.wait(timeout=60) == 130
        deadline = time.monotonic() + 10
        while (left := _leftovers(seen, deployment_id)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the last SIGKILLed processes are being reaped
        assert not left, f"left behind: {left}"
    finally:
        for pid in descendants(chaos.pid) | {chaos.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        chaos.wait()


def _leftovers(pids: set[int], deployment_id: str) -> list[str]:
    prefix = f"dpinfer-{deployment_id}-"
    files = [n for d in ("/dev/shm", "/tmp") for n in os.listdir(d) if n.startswith(prefix)]
    return [f"{p} {_cmdline(p)[:80]}" for p in sorted(pids) if alive(p)] + files


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_vanished_client_the_hub_kept_fails_its_check() -> None:
    from dpinfer.chaos.invariants import check_vanished

    assert check_vanished([True, True], 1, 0, expected_clients=1).ok
    assert not check_vanished([True, False], 1, 0, expected_clients=1).ok
    assert not check_vanished([True], 2, 0, expected_clients=1).ok
    assert not check_vanished([True], 1, 4, expected_clients=1).ok
