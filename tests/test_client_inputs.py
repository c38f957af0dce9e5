"""Client-side pure parts: prompt/image normalisation into request bodies and the sans-IO session."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dpinfer import protocol as p
from dpinfer.client.inputs import (
    as_prompt_list,
    as_sampling_list,
    build_request,
    encode_image,
    request_body,
)
from dpinfer.client.session import ClientSession, ControlError, check_acknowledgement
from dpinfer.errors import InvalidRequestError
from dpinfer.outputs import GenerationResult, StreamDelta
from dpinfer.protocol.bodies import ChatMessage, RawImage, RequestBody
from dpinfer.sampling import SamplingParams


def _body(*args: object, **kwargs: object) -> dict:
    return p.unpack_body(request_body(*args, **kwargs))  # type: ignore[arg-type]


def test_prompt_forms_become_request_bodies() -> None:
    assert _body("hi") == {"prompt": "hi"}, "default fields are left out"
    assert _body([5, 6, np.int64(7)])["prompt"] == [5, 6, 7]
    chat = _body({"messages": [{"role": "user", "content": "yo"}]}, SamplingParams(max_new_tokens=3))
    assert chat == {"messages": [{"role": "user", "content": "yo"}], "sampling": {"max_new_tokens": 3}}
    assert set(_body({"prompt": "x"})) <= p.REQUEST_BODY_FIELDS


def test_the_client_builds_the_body_the_rank_decodes() -> None:
    built = build_request({"messages": [{"role": "user", "content": "yo"}]}, {"top_k": 2})
    assert built == RequestBody(messages=(ChatMessage("user", "yo"),), sampling=SamplingParams(top_k=2))
    assert RequestBody.from_bytes(built.to_bytes()) == built


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([1, -2], "prompt[1] = -2 is out of vocabulary"),
        ([1, True], "prompt[1] must be an integer token id, got bool"),
        ({"prompt": "x", "messages": []}, "exactly one of 'prompt' or 'messages'"),
        ({"text": "x"}, "unknown prompt key(s): text"),
        ({"messages": [{"role": "u"}]}, "messages[0] is missing the field 'content'"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0]: role must be a non-empty string"),
        (3.5, "prompt must be a string or a list of token ids, got float"),
    ],
)
def test_bad_prompts_raise_invalid_request(bad: object, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        request_body(bad)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_single_versus_list_of_prompts() -> None:
    assert as_prompt_list("a") == ["a"]
    assert as_prompt_list([1, 2, 3]) == [[1, 2, 3]]  # token ids: one prompt
    assert as_prompt_list([[1, 2], [3]]) == [[1, 2], [3]]
    assert as_prompt_list(["a", {"prompt": "b"}]) == ["a", {"prompt": "b"}]
    with pytest.raises(InvalidRequestError):
        as_prompt_list([])


def test_sampling_params_one_for_all_or_one_each() -> None:
    one = SamplingParams(max_new_tokens=2)
    assert as_sampling_list(one, 3) == [one] * 3
    assert as_sampling_list(None, 2) == [SamplingParams()] * 2
    assert as_sampling_list({"temperature": 0}, 1)[0].greedy
    each = as_sampling_list([one, SamplingParams(max_new_tokens=5)], 2)
    assert [s.max_new_tokens for s in each] == [2, 5]
    with pytest.raises(InvalidRequestError, match="2 sampling params for 3 prompts"):
        as_sampling_list([one, one], 3)
    with pytest.raises(InvalidRequestError, match="unknown sampling field"):
        as_sampling_list({"nucleus": 0.5}, 1)


def test_images_travel_as_bytes_or_raw_arrays(tmp_path: object) -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    raw = encode_image(pixels)
    assert raw == RawImage((2, 3, 3), "uint8", pixels.tobytes())
    pil = encode_image(Image.fromarray(pixels))
    assert pil == raw
    assert encode_image(pixels[:, :, 0]) == RawImage((2, 3, 1), "uint8", pixels[:, :, 0].tobytes())
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path = f"{tmp_path}/x.png"
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    assert encode_image(path) == buf.getvalue() == encode_image(buf.getvalue())
    body = _body({"prompt": "look", "images": [path]}, images=[pixels])
    assert body["images"] == [
        buf.getvalue(),
        {"shape": [2, 3, 3], "dtype": "uint8", "data": pixels.tobytes()},
    ]
    for bad, message in (
        (np.zeros((2, 2, 3), np.float32), "dtype must be 'uint8'"),
        (np.zeros((2, 2, 7), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((0, 2, 3), np.uint8), "positive sizes"),
        (f"{tmp_path}/missing.png", "cannot read image"),
        (b"", "image bytes are empty"),
        (42, "unsupported image type int"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            encode_image(bad)  # type: ignore[arg-type]


class _Recorder(ClientSession):
    def __init__(self) -> None:
        super().__init__("tcp://test", "t")
        self.events: list[object] = []

    def on_delta(self, delta: StreamDelta) -> None:
        self.events.append(delta)

    def on_result(self, result: GenerationResult, tail: StreamDelta | None) -> None:
        self.events.append(tail if tail is not None else result)

    def on_lost(self, reason: str) -> None:
        self.events.append(reason)


def _outputs(*items: tuple[int, bool, p.OutputBody]) -> list[object]:
    entries = tuple(p.OutputEntry(i, final, 1) for i, final, _ in items)
    return p.encode(p.Outputs(entries, tuple(b.to_bytes() for _, _, b in items)))


def test_session_turns_outputs_into_results_and_deltas() -> None:
    s = _Recorder()
    plain, streamed = s.add(stream=False, rank=None), s.add(stream=True, rank=1)
    assert plain.rank == p.NO_RANK and streamed.rank == 1
    a, b = plain.client_request_id, streamed.client_request_id
    s.dispatch(_outputs((b, False, p.OutputBody(delta_text="he", delta_token_ids=(1,)))))
    s.dispatch(
        _outputs(
            (a, True, p.OutputBody(text="ok", token_ids=(9,), finish_reason="stop", completion_tokens=1)),
            (b, True, p.OutputBody(text="hey", delta_text="y", finish_reason="length")),
            (99, True, p.OutputBody(finish_reason="stop")),  # unknown id: dropped
        )
    )
    first, result, tail = s.events
    assert first == StreamDelta(b, "he", (1,))
    assert isinstance(result, GenerationResult) and result.text == "ok" and result.rank == 1
    assert result.token_ids == (9,) and result.latency_s > 0
    assert isinstance(tail, StreamDelta) and tail.finished and tail.text == "y" and tail.result.text == "hey"
    assert s.num_dropped == 1 and s.inflight_ids == []


def test_session_request_error_is_a_result_and_shutdown_is_lost() -> None:
    s = _Recorder()
    rid = s.add(stream=False, rank=None).client_request_id
    s.dispatch(p.encode(p.Error("invalid_request", "prompt too long", rid)))
    (result,) = s.events
    assert result.finish_reason == "error" and "prompt too long" in result.error
    s.add(stream=False, rank=None)
    s.dispatch([b"\xc1garbage"])
    s.dispatch(p.encode(p.Notice("shutdown", "bye")))
    assert s.num_dropped == 1 and "shut down" in s.events[-1] and s.inflight_ids == []


def test_refused_control_raises_service_error_naming_state() -> None:
    s = ClientSession("tcp://x", "t")
    got: list[object] = []
    s.on_control = lambda cid, ack: got.append(ack)  # type: ignore[method-assign]
    refused = p.ControlAcknowledgement(
        "unpause", p.EngineState.RUNNING, False, (), "cannot unpause while running"
    )
    s.dispatch(p.encode(p.ControlReply(1, refused)))
    with pytest.raises(ControlError, match="while running") as info:
        check_acknowledgement(got[0])  # type: ignore[arg-type]
    assert info.value.acknowledgement.state == "running"
