"""The wire protocol: round trips, validation, and garbage that must raise ProtocolError only."""

from __future__ import annotations

import random

import msgpack
import pytest

from dpinfer import protocol as p
from dpinfer.errors import InvalidRequestError, ProtocolError
from dpinfer.protocol.bodies import ChatMessage, ImagePart, RawImage, RequestBody, TextPart
from dpinfer.sampling import SamplingParams

SAMPLES: list[p.Message] = [
    p.ClientHello(p.PROTOCOL_VERSION, "test"),
    p.Submit((p.SubmitEntry(1, p.NO_RANK, False), p.SubmitEntry(2, 3, True)), (b"a", b"b")),
    p.Abort((1, 2, 3)),
    p.Control(7, p.Signal.PAUSE.value, {"drain": True}),
    p.StatusQuery(1),
    p.ClientBye(),
    p.HelloAck(1, "running", 2),
    p.Outputs((p.OutputEntry(1, True, 0),), (b"x",)),
    p.ControlReply(
        7,
        p.ControlAcknowledgement(
            "pause", p.EngineState.PAUSED, True, (p.RankAck(0, True, p.EngineState.PAUSED, ""),), ""
        ),
    ),
    p.StatusReply(1, (b"{}",)),
    p.Error("bad", "what", 4),
    p.Notice("shutdown", "bye"),
    p.Register(1, 0, 123, "host", "cpu", "tiny-llama", 2048, 4096),
    p.Heartbeat(p.LoadStats(1, 2, 3, 4, 10), p.EngineState.RUNNING),
    p.EngineOutputs((p.EngineOutputEntry(5, False, 1),), (b"y",)),
    p.ControlAck(7, p.Signal.PAUSE, p.RankAck(0, True, p.EngineState.PAUSED, "")),
    p.Deregister("stopped"),
    p.RegisterAck(0, "running", 0.5),
    p.Requests((p.RequestEntry(5, True),), (b"z",)),
    p.EngineAbort((5,)),
    p.EngineControl(7, "stop", {}),
    p.CacheReport(b"\x01" * 16, b"\x02" * 8, True),
    p.Outputs((p.OutputEntry(1, True, 0, p.RouteInfo("cache_aware", 256, "match")),), (b"x",)),
    p.Submit((p.SubmitEntry(1, p.NO_RANK, False, b"\x03" * 8),), (b"a",)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    assert p.decode(p.encode(msg)) == msg


def test_every_kind_has_a_sample() -> None:
    assert {m.KIND for m in SAMPLES} == set(p.Kind)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xc1"],
        [msgpack.packb([])],
        [msgpack.packb(["x"])],
        [msgpack.packb([999])],
        [msgpack.packb([int(p.Kind.CLIENT_HELLO), "1", "x"])],
        [msgpack.packb([int(p.Kind.CLIENT_HELLO), 1])],
        [msgpack.packb([int(p.Kind.SUBMIT), [[1, -1, False]]])],  # entry without body
        [msgpack.packb([int(p.Kind.SUBMIT), [[1, -1]]]), b"x"],  # short entry
        [msgpack.packb([int(p.Kind.ABORT), [1]]), b"extra"],
        [msgpack.packb([int(p.Kind.CONTROL), 1, "pause", {1: 2}])],
        [msgpack.packb({"kind": 1})],
    ],
)
def test_invalid_frames_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        p.decode(frames)


def test_random_garbage_only_ever_raises_protocol_error() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:
            kind = rng.choice(list(p.Kind))
            fields = [rng.choice([0, -1, "s", b"b", 1.5, None, [], {}, [[1, 2, 3]]]) for _ in range(4)]
            frames[0] = msgpack.packb([int(kind), *fields[: rng.randint(0, 4)]])
        try:
            p.decode(frames)
        except ProtocolError:
            pass


def test_state_machine() -> None:
    S, G = p.EngineState, p.Signal
    assert p.next_state(S.RUNNING, G.PAUSE) is S.PAUSED
    assert p.next_state(S.PAUSED, G.SUSPEND) is S.SUSPENDED
    assert p.next_state(S.SUSPENDED, G.RESUME) is S.PAUSED
    assert p.next_state(S.PAUSED, G.UNPAUSE) is S.RUNNING
    with pytest.raises(ProtocolError, match="while running"):
        p.next_state(S.RUNNING, G.RESUME)
    with pytest.raises(ProtocolError, match="while running"):
        p.next_state(S.RUNNING, G.SUSPEND)


def test_output_body_round_trip() -> None:
    body = p.OutputBody(text="hi", token_ids=(1, 2), finish_reason="stop", prompt_tokens=3)
    assert p.OutputBody.from_bytes(body.to_bytes()) == body
    with pytest.raises(ProtocolError):
        p.OutputBody.from_bytes(msgpack.packb({"nope": 1}))


def test_request_body_round_trip_leaves_defaults_out() -> None:
    body = RequestBody(
        messages=(ChatMessage("user", (TextPart("look: "), ImagePart())),),
        images=(b"\x89PNG", RawImage((1, 2, 3), "uint8", bytes(6))),
        sampling=SamplingParams(max_new_tokens=3, stop=("x",)),
    )
    wire = msgpack.unpackb(body.to_bytes())
    assert wire["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image"}]}
    ]
    assert wire["sampling"] == {"max_new_tokens": 3, "stop": ["x"]}
    assert set(wire) == {"messages", "images", "sampling"} <= p.REQUEST_BODY_FIELDS
    assert RequestBody.from_bytes(body.to_bytes()) == body
    assert RequestBody.from_bytes(RequestBody(prompt=(1, 2)).to_bytes()).sampling == SamplingParams()


def test_request_body_checks_run_on_construction_too() -> None:
    with pytest.raises(InvalidRequestError, match="exactly one of 'prompt' or 'messages'"):
        RequestBody()
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        RequestBody(prompt="")
    with pytest.raises(InvalidRequestError, match="needs 6"):
        RawImage((1, 2, 3), "uint8", b"")
    with pytest.raises(InvalidRequestError, match=r"sampling: max_new_tokens must be >= 1, got 0"):
        RequestBody.from_builtins({"prompt": "x", "sampling": {"max_new_tokens": 0}})


def test_random_request_bodies_only_ever_raise_invalid_request() -> None:
    rng = random.Random(1)
    values: list[object] = [0, -1, "", "s", b"", b"b", 1.5, None, True, [], {}, [1, "x"], {"a": 1}]
    fields = [*sorted(p.REQUEST_BODY_FIELDS), "shape", "role", "x"]
    for _ in range(3000):
        if rng.random() < 0.3:
            frame = rng.randbytes(rng.randint(0, 30))
        else:
            body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 4))}
            if rng.random() < 0.5:
                body["prompt"] = rng.choice(["x", [1, 2], ""])
            frame = msgpack.packb(body)
        try:
            RequestBody.from_bytes(frame)
        except InvalidRequestError as e:
            assert str(e), "every rejection says why"


def test_sampling_params_validation() -> None:
    assert SamplingParams.from_dict(SamplingParams(top_k=3, stop="x").to_dict()).stop == ("x",)
    assert SamplingParams(stop=["a"], stop_token_ids=[2]).to_dict() == {"stop": ["a"], "stop_token_ids": [2]}
    for bad in (
        {"max_new_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": "3"},
        {"bogus": 1},
        {"stop": [""]},
        {"temperature": float("nan")},
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams.from_dict(bad)


def test_ipv6_hosts_get_brackets_in_the_bind_address() -> None:
    from dpinfer.config import CoordinatorConfig

    assert CoordinatorConfig(host="::1", port=5).bind_address == "tcp://[::1]:5"
    assert CoordinatorConfig(host="127.0.0.1", port=5).bind_address == "tcp://127.0.0.1:5"


def test_a_submit_batch_of_any_size_splits_under_the_header_limit_and_never_splits_a_group() -> None:
    from dpinfer.protocol import codec
    from dpinfer.protocol.kinds import MAX_HEADER_BYTES

    keys = b"\x07" * 256  # a long prompt's full prefix keys
    entries = [p.SubmitEntry(i + 1, p.NO_RANK, False, keys) for i in range(5000)]
    for i in range(1020, 1030):  # a group of completions straddling the first boundary
        entries[i] = entries[i]._replace(group=99)
    bodies = [b"body %d" % i for i in range(5000)]
    assert len(p.encode(p.Submit(tuple(entries), tuple(bodies)))[0]) > MAX_HEADER_BYTES, "one would not do"
    messages = p.encode_submits(entries, bodies)
    assert len(messages) == 5
    decoded = []
    for frames in messages:
        assert len(frames[0]) < MAX_HEADER_BYTES // 2
        decoded.extend(codec.submit_entries(frames[0], len(frames) - 1))
        assert [e.group for e in codec.submit_entries(frames[0], len(frames) - 1)].count(99) in (0, 10)
    assert decoded == entries
    assert [f for frames in messages for f in frames[1:]] == bodies
    assert p.encode_submits([], []) == []
