"""Control escalation: while a draining STOP waits for its deadline, `stop --abort` and SHUTDOWN
go first, and the caller of the pre-empted STOP is told so (issue 9, case 5)."""

from __future__ import annotations

import pytest

from dpinfer.protocol import EngineState

SLOW_S = 20.0
"""Each request on the slow rank takes this long: far beyond what any test here waits."""


@pytest.mark.parametrize(("signal", "args"), [("stop", {"drain": False}), ("shutdown", {})])
def test_an_aborting_signal_preempts_a_draining_stop(deployment_factory, signal: str, args: dict) -> None:
    dep = deployment_factory([0], {0: {"delay_s": SLOW_S}})
    c = dep.client
    ids = c.submit(["slow"])
    c.wait_ranks(lambda s: s["ranks"][0]["in_flight"] == 1, what="the request on its rank")
    draining = c.send_control("stop", {"drain": True, "deadline_s": 60.0})
    escalation = c.send_control(signal, args)
    first = c.wait_control(draining, timeout_s=5)
    assert not first.ok and "pre-empted" in first.error and first.state == EngineState.STOPPED
    second = c.wait_control(escalation, timeout_s=5)
    assert second.ok, second.error
    assert [(a.rank, a.ok) for a in second.acks] == [(0, True)]
    (result,) = c.wait_results(ids, timeout_s=5)
    assert result.num_finals == 1 and result.final.finish_reason == "abort"


def test_other_signals_still_wait_for_the_draining_stop(deployment_factory) -> None:
    dep = deployment_factory([0], {0: {"delay_s": 0.5}})
    c = dep.client
    ids = c.submit(["drains"])
    c.wait_ranks(lambda s: s["ranks"][0]["in_flight"] == 1, what="the request on its rank")
    draining = c.send_control("stop", {"drain": True, "deadline_s": 30.0})
    gentle = c.send_control("stop", {"drain": True})
    first = c.wait_control(draining, timeout_s=10)
    assert first.ok, "a draining STOP is not pre-empted by another draining STOP"
    (result,) = c.wait_results(ids, timeout_s=5)
    assert result.final.finish_reason == "stop" and result.final.text == "echo: drains"
    second = c.wait_control(gentle, timeout_s=5)
    assert not second.ok and "cannot stop while stopped" in second.error
