"""Request parsing: every bad input gets a clear ``InvalidRequestError``; good ones tokenize right."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from transformers import ByT5Tokenizer

from dpinfer.errors import InvalidRequestError
from dpinfer.protocol.local import RawRequest
from dpinfer.runner.builtin_models import TINY_CHAT_TEMPLATE
from dpinfer.sampling import SamplingParams
from dpinfer.tokenizer.request_parsing import RequestParser, appends_eos, max_token_bytes

MAX_PROMPT = 32


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    tok = ByT5Tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


@pytest.fixture
def parser(tokenizer: ByT5Tokenizer) -> RequestParser:
    return RequestParser(
        tokenizer=tokenizer,
        model_name="tiny-llama",
        vocab_size=384,
        max_prompt_len=MAX_PROMPT,
        add_special_tokens=not appends_eos(tokenizer),
    )


def raw(body: Any, request_id: int = 5, stream: bool = False) -> RawRequest:
    data = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return RawRequest(request_id, stream, data)


def test_byt5_prompts_do_not_get_eos(parser: RequestParser, tokenizer: ByT5Tokenizer) -> None:
    assert appends_eos(tokenizer) and not parser.add_special_tokens
    req = parser.parse(raw({"prompt": "hé", "sampling": {"max_new_tokens": 3, "temperature": 0.0}}, 9, True))
    assert req.input_ids == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3]  # bytes at b+3, no EOS
    assert req.request_id == 9 and req.stream is True
    assert req.sampling.max_new_tokens == 3 and req.sampling.greedy


def test_token_ids_and_chat_messages(parser: RequestParser, tokenizer: ByT5Tokenizer) -> None:
    assert parser.parse(raw({"prompt": [3, 100, 383]})).input_ids == [3, 100, 383]
    msgs = [{"role": "user", "content": "hi"}]
    req = parser.parse(raw({"messages": msgs}))
    expected = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert req.input_ids == list(expected["input_ids"])
    assert tokenizer.decode(req.input_ids).endswith("<|assistant|>")


BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("empty prompt", {"prompt": ""}, "prompt is empty"),
    ("empty token list", {"prompt": []}, "prompt is empty"),
    ("too long", {"prompt": "x" * (MAX_PROMPT + 1)}, f"at most {MAX_PROMPT}"),
    ("too long ids", {"prompt": [5] * (MAX_PROMPT + 1)}, "33 tokens"),
    ("max_new_tokens 0", {"prompt": "a", "sampling": {"max_new_tokens": 0}}, "max_new_tokens must be >= 1"),
    ("negative temperature", {"prompt": "a", "sampling": {"temperature": -0.5}}, "temperature must be >= 0"),
    ("nan temperature", {"prompt": "a", "sampling": {"temperature": float("nan")}}, "must be finite"),
    ("top_p 0", {"prompt": "a", "sampling": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
    ("top_p > 1", {"prompt": "a", "sampling": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    ("top_k negative", {"prompt": "a", "sampling": {"top_k": -1}}, "sampling: top_k must be >= 0"),
    ("empty stop string", {"prompt": "a", "sampling": {"stop": [""]}}, "stop must hold non-empty strings"),
    ("unknown field", {"prompt": "a", "temperature": 0.1}, "unknown request field(s): temperature (valid:"),
    (
        "unknown sampling field",
        {"prompt": "a", "sampling": {"best_of": 2}},
        "unknown sampling field(s): best_of (valid:",
    ),
    ("prompt wrong type", {"prompt": 42}, "prompt must be a string or a list of token ids, got int"),
    (
        "temperature wrong type",
        {"prompt": "a", "sampling": {"temperature": "hot"}},
        "sampling.temperature must be a number, got str",
    ),
    (
        "max_new_tokens float",
        {"prompt": "a", "sampling": {"max_new_tokens": 2.5}},
        "sampling.max_new_tokens must be an integer, got float",
    ),
    ("stop not a list", {"prompt": "a", "sampling": {"stop": "x"}}, "sampling.stop must be a list, got str"),
    ("sampling not a map", {"prompt": "a", "sampling": [1, 2]}, "sampling must be a map"),
    (
        "token id too big",
        {"prompt": [3, 384]},
        "prompt[1] = 384 is out of vocabulary (valid token ids: 0..383)",
    ),
    ("token id negative", {"prompt": [-1]}, "prompt[0] = -1 is out of vocabulary"),
    ("token id bool", {"prompt": [True]}, "prompt[0] must be an integer token id, got bool"),
    ("token id str", {"prompt": ["a"]}, "prompt[0] must be an integer token id, got str"),
    ("both prompt and messages", {"prompt": "a", "messages": []}, "exactly one of 'prompt' or 'messages'"),
    ("neither", {"sampling": {}}, "exactly one of 'prompt' or 'messages'"),
    ("messages not a list", {"messages": "hi"}, "messages must be a non-empty list"),
    ("empty messages", {"messages": []}, "messages must be a non-empty list"),
    ("message not a map", {"messages": ["hi"]}, "messages[0] must be a {role, content} map, got str"),
    (
        "message bad content",
        {"messages": [{"role": "user", "content": 3}]},
        "messages[0].content must be a string or a list of parts, got int",
    ),
    (
        "content parts on a text model",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
        "messages[0].content must be a string: model 'tiny-llama' is text-only",
    ),
    (
        "bad content part",
        {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
        "messages[0].content[0].type must be 'text' or 'image', got 'video'",
    ),
    ("message no role", {"messages": [{"content": "x"}]}, "messages[0] is missing the field 'role'"),
    ("message empty role", {"messages": [{"role": "", "content": "x"}]}, "role must be a non-empty string"),
    (
        "message extra key",
        {"messages": [{"role": "u", "content": "x", "foo": 1}]},
        "unknown messages[0] field(s): foo (valid: content, role)",
    ),
    (
        "images on text model",
        {"prompt": "a", "images": [b"\x89PNG"]},
        "text-only and does not accept 'images'",
    ),
    ("images not a list", {"prompt": "a", "images": "x"}, "images must be a list of images, got str"),
    ("empty image bytes", {"prompt": "a", "images": [b""]}, "images[0]: image bytes are empty"),
    (
        "image not bytes or a map",
        {"prompt": "a", "images": [b"x", [1, 2, 3]]},
        "images[1] must be encoded image bytes or a {shape, dtype, data} map, got list",
    ),
    ("model_inputs on text model", {"prompt": "a", "model_inputs": {}}, "does not accept 'model_inputs'"),
    ("body not a map", [1, 2, 3], "request body must be a map, got list"),
    ("field name not a string", {1: 2}, "field names must be strings"),
]

RAW = {"shape": [30, 50, 3], "dtype": "uint8", "data": b"\x00" * 4500}
BAD_RAW_IMAGES: list[tuple[dict[str, Any], str]] = [
    ({**RAW, "dtype": "float32"}, "images[0]: raw image dtype must be 'uint8', got 'float32'"),
    ({**RAW, "shape": [30, 50]}, "shape must be [height, width, channels]"),
    ({**RAW, "shape": [30, 50, 2]}, "1, 3 or 4 channels"),
    ({**RAW, "shape": [0, 50, 3]}, "positive sizes"),
    ({**RAW, "shape": [30, 50, "3"]}, "images[0].shape[2] must be an integer, got str"),
    ({**RAW, "data": b"\x00" * 10}, "has 10 bytes, shape [30, 50, 3] needs 4500"),
    ({**RAW, "extra": 1}, "unknown images[0] field(s): extra (valid: data, dtype, shape)"),
    ({"shape": [30, 50, 3], "dtype": "uint8"}, "images[0] is missing the field 'data'"),
]


@pytest.mark.parametrize(("body", "expected"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(parser: RequestParser, body: Any, expected: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parser.parse(raw(body))
    assert expected in str(info.value)


@pytest.mark.parametrize(("image", "expected"), BAD_RAW_IMAGES)
def test_bad_raw_images_are_rejected_before_the_model(
    parser: RequestParser, image: dict[str, Any], expected: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parser.parse(raw({"prompt": "a", "images": [image]}))
    assert expected in str(info.value)


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x92\x01", b"\xff" * 10])
def test_undecodable_body(parser: RequestParser, garbage: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="request body"):
        parser.parse(raw(garbage))


def test_sampling_reaches_the_request(parser: RequestParser) -> None:
    body = {"prompt": [3, 4], "sampling": {"stop": ["x"], "stop_token_ids": [7], "temperature": 0}}
    req = parser.parse(raw(body))
    assert req.sampling == SamplingParams(stop=("x",), stop_token_ids=(7,), temperature=0.0)
    assert req.input_ids == [3, 4] and req.mm_inputs is None


def test_chat_without_template_is_an_error() -> None:
    parser = RequestParser(ByT5Tokenizer(), "plain", 384, 100, add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="has no chat template; send 'prompt' instead"):
        parser.parse(raw({"messages": [{"role": "user", "content": "hi"}]}))


def test_chat_template_exception_becomes_an_error(tokenizer: ByT5Tokenizer) -> None:
    strict = ByT5Tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    parser = RequestParser(strict, "strict", 384, 100, add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        parser.parse(raw({"messages": [{"role": "user", "content": "hi"}]}))


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"stop": ["x"] * 200_000}, "stop holds 200000 strings; at most 16"),
        ({"stop": ["y" * 10_000]}, "stop strings may be at most 256 characters"),
        ({"stop_token_ids": list(range(1000))}, "stop_token_ids holds 1000 ids; at most 64"),
    ],
)
def test_stop_conditions_are_bounded(parser: RequestParser, sampling: dict[str, Any], expected: str) -> None:
    """200,000 stop strings once made every token of every request on the rank cost 128 ms."""
    with pytest.raises(InvalidRequestError, match=expected):
        parser.parse(raw({"prompt": "a", "sampling": sampling}))


def test_text_that_cannot_fit_is_refused_before_tokenizing(
    parser: RequestParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 MB prompt used to be tokenized in full before it was rejected as too long."""

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the prompt was tokenized")

    big = "z" * (2 << 20)
    monkeypatch.setattr(type(parser.tokenizer), "__call__", no_tokenizing)
    with pytest.raises(InvalidRequestError, match="cannot fit in"):
        parser.parse(raw({"prompt": big}))
    with pytest.raises(InvalidRequestError, match="cannot fit in"):
        parser.parse(raw({"messages": [{"role": "user", "content": big}]}))


def test_the_byte_bound_is_sound_for_the_tokenizers_shipped(tokenizer: ByT5Tokenizer) -> None:
    """No text needs fewer tokens than its bytes over the longest token: the bound never refuses
    a prompt that would fit."""
    longest = max_token_bytes(tokenizer)
    for text in ("plain ascii", "é ü ß 漢字 🙂", "<extra_id_0> tags", "x" * 500):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(text.encode()) <= len(ids) * longest


def test_an_oversized_body_is_refused_before_decoding(parser: RequestParser) -> None:
    small = RequestParser(**{**parser.__dict__, "max_body_bytes": 1000})
    with pytest.raises(InvalidRequestError, match=r"request body of \d+ bytes; at most 1000"):
        small.parse(raw({"prompt": "a" * 2000}))
