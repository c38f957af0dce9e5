"""The request bodies of the OpenAI endpoints as msgspec structs: one C call decodes and
type-checks a body, and the same structs give ``/openapi.json`` its schemas.

Only types are checked here (a wrong type is a 400 naming the field); every rule on a value
(ranges, empty prompts, stop strings...) is ``SamplingParams``' and ``RequestBody``'s, applied
when the request is built. Unknown fields are refused by name, as OpenAI does. Fields that
OpenAI defines but the engine cannot honour yet are accepted at their neutral value and
refused otherwise (``sampling.py`` of this package says which).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

PromptField = Annotated[
    str | list[str | int | list[int]],
    Meta(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.",
        extra_json_schema={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            ]
        },
    ),
]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None
    """Add a last chunk with ``usage`` (and empty ``choices``)."""


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fields both endpoints share."""

    model: str | None = None
    """The served model name (default: the one being served)."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    """Extra (vLLM): keep the k most likely tokens; 0 or -1 disables."""
    ignore_eos: bool = False
    """Extra (vLLM): keep generating past EOS."""
    min_tokens: int | None = None
    """Extra (vLLM): generate at least this many tokens (EOS and stop tokens masked until then)."""
    stop_token_ids: list[int] | None = None
    """Extra (vLLM): token ids that end generation."""
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    """Extra (vLLM): ``transformers``' repetition penalty over prompt and output (1 disables)."""
    include_stop_str_in_output: bool | None = None
    """Extra (vLLM): keep the matched stop string in the text."""
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/completions``."""

    prompt: PromptField
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ImageURL(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    """A ``data:image/...;base64,`` URL, or ``file://`` under ``--allowed-local-media-path``."""
    detail: str | None = None


class TextContent(msgspec.Struct, forbid_unknown_fields=True, tag="text", tag_field="type"):
    text: str


class ImageContent(msgspec.Struct, forbid_unknown_fields=True, tag="image_url", tag_field="type"):
    image_url: ImageURL


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[TextContent | ImageContent]
    name: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class UpdateWeightsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /update_weights``: a checkpoint directory every rank can read."""

    path: str


# ---------------------------------------------------------------------------- responses (docs only)


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int
    """Prompt tokens served from the rank's prefix cache (once per prompt, as ``prompt_tokens``)."""


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    """The ``logprobs`` most likely tokens and the sampled one."""
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice (vLLM); null for EOS or length."""


class CompletionResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice (vLLM); null for EOS or length."""


class ChatCompletionResponse(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelCard]


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorObject


DOCUMENTED = (
    CompletionRequest,
    ChatCompletionRequest,
    UpdateWeightsRequest,
    CompletionResponse,
    ChatCompletionResponse,
    ModelList,
    ErrorResponse,
)


EXAMPLES: dict[str, list[dict[str, object]]] = {
    "CompletionRequest": [
        {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.0},
        {"prompt": ["One", "Two"], "max_tokens": 4, "n": 2, "stop": ["."], "seed": 1, "stream": True,
         "stream_options": {"include_usage": True}},
    ],
    "ChatCompletionRequest": [
        {"messages": [{"role": "user", "content": "Hello!"}], "max_completion_tokens": 16},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
         "stream": True, "top_k": 5, "ignore_eos": True, "max_tokens": 4},
    ],
}  # fmt: skip
"""Request examples for ``/openapi.json`` (the docs page shows them; schema fuzzers start there)."""


def openapi_components() -> dict[str, object]:
    """JSON schemas of ``DOCUMENTED`` (and what they refer to), for ``components.schemas``."""
    _, components = msgspec.json.schema_components(DOCUMENTED, ref_template="#/components/schemas/{name}")
    for name, examples in EXAMPLES.items():
        components[name]["examples"] = examples
    return dict(components)


def ref(struct: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{struct.__name__}"}
