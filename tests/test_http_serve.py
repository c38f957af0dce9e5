"""The OpenAI-compatible front of `dpinfer serve --dp 2`, driven with the `openai` package.

One deployment serves the module (API key and admin key set, one API worker that may have 8
requests in flight, so that a 9th is `overloaded`); the tests run in file order and the last
one stops it with `dpinfer stop`, after which `serve` exits by itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from conftest import ServeProcess

from dpinfer import InferenceClient, SamplingParams

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
MODEL = "tiny-llama"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def served(serve_process: Callable[[list[str]], ServeProcess]) -> ServeProcess:
    return serve_process([
        "--model", MODEL, "--dp", "2", "--http-port", "0", "--api-key", API_KEY,
        "--admin-api-key", ADMIN_KEY, "--max-client-requests", "8",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def api(served: ServeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def _status(served: ServeProcess) -> dict:
    with InferenceClient(served.address, timeout_s=10) as client:
        return client.status()


def _post(served: ServeProcess, path: str, body: object, key: str | None = API_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served.http_url + path, json=body, headers=headers, timeout=60)


# ---------------------------------------------------------------------------- completions


def test_completion_streamed_deltas_concatenate_to_the_non_streamed_text(api: openai.OpenAI) -> None:
    whole = api.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, **GREEDY)
    assert whole.object == "text_completion" and whole.model == MODEL and whole.id.startswith("cmpl-")
    assert len(whole.choices) == 1 and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(api.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_streamed_deltas_concatenate_and_the_first_chunk_has_the_role(api: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text and whole.usage is not None and whole.usage.completion_tokens == 10

    chunks = list(
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_list_prompts_token_ids_and_n_give_every_choice_in_order(api: openai.OpenAI) -> None:
    single = {p: api.completions.create(model=MODEL, prompt=p, max_tokens=6, **GREEDY).choices[0].text
              for p in ("abc", "xyz")}  # fmt: skip
    both = api.completions.create(model=MODEL, prompt=["abc", "xyz"], n=2, max_tokens=6, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [single["abc"]] * 2 + [single["xyz"]] * 2
    assert both.usage is not None and both.usage.completion_tokens == 4 * 6

    token_ids = [[100, 101, 102], [123, 124, 125]]  # ByT5: byte + 3, so "abc" and "xyz"
    by_ids = api.completions.create(model=MODEL, prompt=token_ids, max_tokens=6, **GREEDY)
    assert [c.text for c in by_ids.choices] == [single["abc"], single["xyz"]]

    sampled = api.completions.create(model=MODEL, prompt="abc", n=3, max_tokens=8, seed=7, temperature=1.0)
    again = api.completions.create(model=MODEL, prompt="abc", n=3, max_tokens=8, seed=7, temperature=1.0)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices], "seeded choices differ"


def test_n_completions_prefill_the_prompt_once_on_one_rank(served: ServeProcess, api: openai.OpenAI) -> None:
    # The SDK: n consecutive results, index 0..n-1, one rank, the prompt computed once.
    prompt = "Parallel sampling shares one prefill of this prompt. " * 3
    params = SamplingParams(n=4, seed=5, temperature=1.0, max_new_tokens=8, ignore_eos=True)
    with InferenceClient(served.address, timeout_s=30) as client:
        results = client.generate(prompt, params)
        again = client.generate(prompt, params)
        deltas = list(client.generate_stream(prompt + "!", SamplingParams(n=2, seed=1, max_new_tokens=6)))
    assert [r.index for r in results] == [0, 1, 2, 3] and all(r.ok for r in results)
    assert len({r.rank for r in results}) == 1
    assert [r.cached_tokens for r in results] == [0] + [results[0].prompt_tokens] * 3
    assert [r.text for r in again] == [r.text for r in results], "seeded: the same four again"
    assert len({r.text for r in results}) == 4, "completion j samples with seed + j"
    finals = {d.index: d.result for d in deltas if d.finished}
    assert sorted(finals) == [0, 1]
    for index, result in finals.items():
        assert result is not None and result.index == index
        assert "".join(d.text for d in deltas if d.index == index) == result.text

    # HTTP: n choices, index 0..n-1, one rank for all; usage says what the prefix cache served.
    fresh = "Zebras graze on a prompt that no rank has seen yet. " * 3
    raw = api.completions.with_raw_response.create(
        model=MODEL, prompt=fresh, n=4, max_tokens=8, seed=5, temperature=1.0
    )
    response = raw.parse()
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage is not None and response.usage.prompt_tokens_details is not None
    assert response.usage.prompt_tokens_details.cached_tokens == 0, "a new prompt, computed once"
    cached = []  # round robin: one of two requests in a row goes to the rank that holds the prompt
    for _ in range(2):
        repeat = api.completions.create(model=MODEL, prompt=fresh, max_tokens=2)
        assert repeat.usage is not None and repeat.usage.prompt_tokens_details is not None
        cached.append(repeat.usage.prompt_tokens_details.cached_tokens)
    assert 0 < max(cached) < repeat.usage.prompt_tokens, "served from the rank's prefix cache"
    routes = raw.headers["x-dpinfer-routing"].split(", ")
    assert len(routes) == 4 and len({r.split("; ")[1] for r in routes}) == 1, routes


def test_stop_strings_end_the_text_before_the_match(api: openai.OpenAI) -> None:
    free = api.completions.create(model=MODEL, prompt="stop here", max_tokens=16, **GREEDY).choices[0].text
    assert len(free) >= 2, f"greedy output too short to cut: {free!r}"
    stop = free[len(free) // 2]
    stopped = api.completions.create(model=MODEL, prompt="stop here", max_tokens=16, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free[: free.index(stop)]
    streamed = api.completions.create(model=MODEL, prompt="stop here", max_tokens=16, stop=stop, stream=True,
                                      **GREEDY)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_extras_top_k_and_ignore_eos_are_accepted(api: openai.OpenAI) -> None:
    out = api.completions.create(
        model=MODEL, prompt="x", max_tokens=5, extra_body={"top_k": 1, "ignore_eos": True}
    )
    assert out.usage is not None and out.usage.completion_tokens == 5


# ---------------------------------------------------------------------------- sampling surface


def test_chat_logprobs_in_openai_shape_streamed_alike(api: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me"}]
    args = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 3,
        **GREEDY,
    }
    whole = api.chat.completions.create(**args)  # type: ignore[call-overload]
    content = whole.choices[0].logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens == 8
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob), (
            "greedy samples the most likely token"
        )
    chunks = list(api.chat.completions.create(**args, stream=True))  # type: ignore[call-overload]
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content, strict=True))
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_openai_shape_and_equal_to_the_sdk(
    served: ServeProcess, api: openai.OpenAI
) -> None:
    whole = api.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    lp = whole.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # (at most 3: the top 2 and the sampled token; fewer when tokens share a text, e.g. lone bytes)
        assert 1 <= len(top) <= 3 and top[token] == value == max(top.values())
    chunks = list(api.completions.create(model=MODEL, prompt="Hello", max_tokens=6, logprobs=2, stream=True,
                                         **GREEDY))  # fmt: skip
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset

    with InferenceClient(served.address, timeout_s=60) as client:
        params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=2, prompt_logprobs=1)
        (result,) = client.generate("Hello", params)
    assert result.logprobs is not None and result.token_texts is not None
    assert [result.token_texts[t] for t in result.token_ids] == lp.tokens
    assert all(abs(e[t] - v) < 1e-4 for e, t, v in zip(result.logprobs, result.token_ids, lp.token_logprobs,
                                                        strict=True))  # fmt: skip
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == result.prompt_tokens
    assert result.prompt_logprobs[0] is None and all(
        len(e or ()) in (1, 2) for e in result.prompt_logprobs[1:]
    )


def test_stop_reason_include_stop_str_penalties_and_min_tokens(api: openai.OpenAI) -> None:
    free = api.completions.create(model=MODEL, prompt="stop here", max_tokens=16, **GREEDY).choices[0]
    assert free.stop_reason is None and free.finish_reason == "length"  # type: ignore[attr-defined]
    stop = free.text[len(free.text) // 2]
    kept = api.completions.create(model=MODEL, prompt="stop here", max_tokens=16, stop=[stop], **GREEDY,
                                  extra_body={"include_stop_str_in_output": True}).choices[0]  # fmt: skip
    assert kept.finish_reason == "stop" and kept.stop_reason == stop  # type: ignore[attr-defined]
    assert kept.text == free.text[: free.text.index(stop) + 1]
    messages = [{"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, presence_penalty=-2.0,
                                       frequency_penalty=0.5, **GREEDY,
                                       extra_body={"repetition_penalty": 1.3, "min_tokens": 12})  # fmt: skip
    assert chat.usage is not None and chat.usage.completion_tokens == 12


def test_models_health_version_and_metrics(served: ServeProcess, api: openai.OpenAI) -> None:
    assert [m.id for m in api.models.list()] == [MODEL]
    health = httpx.get(served.http_url + "/health")
    assert health.status_code == 200 and health.json()["live_ranks"] == 2
    assert httpx.get(served.http_url + "/version").json()["version"]
    metrics = httpx.get(served.http_url + "/metrics")
    assert metrics.status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert any(name.startswith("dpinfer:") for name in names), names


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
        ({"temperature": -1}, "temperature", "temperature must be >= 0"),
        ({"top_p": "high"}, "top_p", "must be a number"),
        ({"n": 0}, "n", "n must be >= 1"),
        ({"foo": 1}, "foo", "unknown parameter 'foo'"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "frequency_penalty must be in [-2.0, 2.0]"),
        ({"logprobs": 21}, "logprobs", "logprobs must be <= 20"),
        ({"min_tokens": 20, "max_tokens": 4}, "min_tokens", "min_tokens must be <= max_tokens (4)"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
        ({"prompt": [[5000]]}, None, "out of vocabulary"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    served: ServeProcess, body: dict, param: str | None, words: str
) -> None:
    response = _post(served, "/v1/completions", {"model": MODEL, "prompt": "x", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    assert error["param"] == param, error


def test_openai_client_sees_each_error_status(served: ServeProcess, api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    for key in ("wrong-key", ADMIN_KEY + "x"):
        bad = openai.OpenAI(base_url=served.http_url + "/v1", api_key=key, max_retries=0)
        with bad, pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert _post(served, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    with openai.OpenAI(base_url=served.http_url + "/v1", api_key=ADMIN_KEY, max_retries=0) as admin:
        assert admin.completions.create(
            model=MODEL, prompt="x", max_tokens=2
        ).choices  # admin is an API key too
    assert httpx.get(served.http_url + "/no/such/path").json()["error"]["type"] == "not_found_error"


def test_overloaded_is_429(served: ServeProcess) -> None:
    """The API worker may have 8 requests in flight (--max-client-requests 8): a 9th is refused."""
    response = _post(served, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 9, "max_tokens": 4})
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert _post(served, "/v1/completions", {"prompt": "x", "n": 8, "max_tokens": 4}).status_code == 200


def test_oversized_body_is_413_before_it_is_read(served: ServeProcess) -> None:
    url = urlsplit(served.http_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + API_KEY.encode()
                     + b"\r\ncontent-length: 1000000000\r\n\r\n{")  # fmt: skip
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"larger than" in head or b"content-length" in head.lower()


def test_control_endpoints_need_the_admin_key(served: ServeProcess) -> None:
    assert _post(served, "/pause", {}, key=None).status_code == 401
    assert _post(served, "/pause", {}, key=API_KEY).status_code == 401
    paused = _post(served, "/pause", {}, key=ADMIN_KEY)
    assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
    refused = _post(served, "/resume", {}, key=ADMIN_KEY)
    assert refused.status_code == 409 and "paused" in refused.json()["error"]["message"]
    assert _post(served, "/unpause", {}, key=ADMIN_KEY).json()["state"] == "running"
    status = httpx.get(served.http_url + "/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert status.status_code == 200 and len(status.json()["ranks"]) == 2


# ---------------------------------------------------------------------------- disconnects


def _wait_idle(served: ServeProcess, idle_kv: dict[int, int], aborted_before: int) -> dict:
    """The coordinator's status once nothing runs, the KV is back to (at most) idle and one more request
    was aborted (heartbeats carry the ranks' load: poll with a deadline)."""
    deadline = time.monotonic() + 15
    while True:
        status = _status(served)
        ranks = {r["rank"]: r for r in status["ranks"]}
        if (
            status["totals"]["aborted"] > aborted_before
            and status["totals"]["in_flight"] == 0
            and all(r["num_running"] == 0 and r["kv_used_tokens"] <= idle_kv[i] for i, r in ranks.items())
        ):
            return status
        assert time.monotonic() < deadline, f"not back to idle: {status['totals']} {list(ranks.values())}"
        time.sleep(0.1)


LONG = {"model": MODEL, "prompt": "a long one", "max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}


def test_a_client_gone_mid_stream_aborts_its_request_and_frees_the_kv(served: ServeProcess) -> None:
    before = _status(served)
    idle_kv = {r["rank"]: r["kv_used_tokens"] for r in before["ranks"]}
    headers = {"authorization": f"Bearer {API_KEY}"}
    http = httpx.Client(timeout=60)
    with http, http.stream("POST", served.http_url + "/v1/completions", json={**LONG, "stream": True},
                           headers=headers) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating now
    _wait_idle(served, idle_kv, before["totals"]["aborted"])


def test_a_client_gone_mid_request_aborts_its_request(served: ServeProcess) -> None:
    before = _status(served)
    idle_kv = {r["rank"]: r["kv_used_tokens"] for r in before["ranks"]}
    url = urlsplit(served.http_url)
    body = json.dumps(LONG).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + API_KEY.encode()
                     + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.monotonic() + 15
        while not any(r["num_running"] for r in _status(served)["ranks"]):
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.1)  # heartbeat-borne load: poll with a deadline
    _wait_idle(served, idle_kv, before["totals"]["aborted"])


def test_the_openai_chat_example_streams_an_answer(served: ServeProcess) -> None:
    import os
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "openai_chat.py"
    done = subprocess.run(
        [sys.executable, str(example), "--base-url", f"{served.http_url}/v1", "--model", MODEL,
         "--max-tokens", "8"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "DPINFER_API_KEY": API_KEY},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 completion tokens" in done.stdout, done.stdout


# ---------------------------------------------------------------------------- stop


def test_dpinfer_stop_makes_serve_exit_by_itself_and_say_why(served: ServeProcess) -> None:
    served.pids |= served.descendants()
    done = subprocess.run([sys.executable, "-m", "dpinfer", "stop", "--address", served.address],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert served.proc.wait(timeout=60) == 0, served.log.read_text()[-3000:]
    assert "were stopped (`dpinfer stop`)" in served.log.read_text()
    deadline = time.monotonic() + 10
    while (left := served.alive()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the last children are being reaped
    assert not left, f"left behind: {left}"
