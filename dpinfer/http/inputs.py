"""An OpenAI request -> the prompts and ``SamplingParams`` of its choices.

Value rules are the engine's own: ``SamplingParams`` checks every sampling value and
``RequestBody`` (built by the SDK on submit) every prompt, and their messages come back as
400s with the OpenAI parameter named (``max_new_tokens`` is called ``max_tokens`` here).
What the engine cannot do (``logit_bias``, ``echo``, tools...) is refused with a 400 that
says so, unless it is given at its neutral value. Logprobs: chat's ``logprobs: true`` with
``top_logprobs: N`` and completions' ``logprobs: N`` become ``SamplingParams.logprobs``; the
penalties, ``min_tokens`` and ``include_stop_str_in_output`` pass through (vLLM's extensions).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import msgspec

from dpinfer.errors import InvalidRequestError
from dpinfer.http.errors import APIError, invalid
from dpinfer.http.schemas import ChatCompletionRequest, CompletionRequest, ImageContent, Message
from dpinfer.sampling import SamplingParams

ENGINE_FIELDS = frozenset(SamplingParams.__struct_fields__)
_PASS_THROUGH = {
    "min_tokens": 0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "include_stop_str_in_output": False,
}
"""OpenAI/vLLM sampling fields the engine may or may not have, with their neutral value."""
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of ``/v1/completions``."""

Prompt = str | list[int] | Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Choice:
    """One prompt to submit: its ``sampling.n`` completions are choices ``i * n .. i * n + n - 1``
    of the response (prompt ``i``; OpenAI's order)."""

    prompt: Prompt
    sampling: SamplingParams


def completion_choices(req: CompletionRequest, max_choices: int) -> list[Choice]:
    _refuse(req.echo, "echo", "echo is not supported")
    _refuse(req.best_of not in (None, 1), "best_of", "best_of is not supported")
    _refuse(bool(req.suffix), "suffix", "suffix is not supported")
    prompts = _prompt_list(req.prompt)
    max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    sampling = _sampling(req, max_tokens, "max_tokens", req.logprobs, "logprobs")
    return _choices(prompts, sampling, req.n, max_choices)


def chat_choices(req: ChatCompletionRequest, allowed_media: str | None, max_choices: int) -> list[Choice]:
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    _refuse(bool(req.tools), "tools", "tools are not supported")
    _refuse(req.tool_choice not in (None, "none", "auto"), "tool_choice", "tool_choice is not supported")
    response_format = (req.response_format or {}).get("type", "text")
    _refuse(
        response_format != "text", "response_format", "only response_format {'type': 'text'} is supported"
    )
    max_tokens: int | None = req.max_tokens
    name = "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
    prompt = chat_prompt(req.messages, allowed_media)
    sampling = _sampling(req, max_tokens, name, logprobs, "top_logprobs")
    return _choices([prompt], sampling, req.n, max_choices)


def _refuse(condition: bool, param: str, message: str) -> None:
    if condition:
        raise APIError(400, message, param=param, code="unsupported_parameter")


def _prompt_list(prompt: str | list[str | int | list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(type(p) is int for p in prompt):
        return [prompt]  # type: ignore[list-item]  # checked: a list of ints
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if prompt and all(isinstance(p, list) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise invalid(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
        "prompt",
    )


def _choices(prompts: list[Prompt], sampling: SamplingParams, n: int, max_choices: int) -> list[Choice]:
    if n < 1:
        raise invalid(f"n must be >= 1, got {n}", "n")
    if len(prompts) * n > max_choices:
        raise invalid(f"n times the number of prompts must be <= {max_choices}, got {len(prompts) * n}", "n")
    if n > 1:  # the SDK sends the n completions together; the rank prefills the prompt once
        try:
            sampling = msgspec.structs.replace(sampling, n=n)
        except InvalidRequestError as e:
            raise invalid(e, "seed" if "seed" in str(e) else "n") from None
    return [Choice(p, sampling) for p in prompts]


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    max_tokens_name: str,
    logprobs: int | None,
    logprobs_name: str,
) -> SamplingParams:
    fields: dict[str, object] = {}
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    if logprobs is not None:
        fields["logprobs"] = logprobs
    if req.temperature is not None:
        fields["temperature"] = req.temperature
    if req.top_p is not None:
        fields["top_p"] = req.top_p
    if req.top_k is not None:
        fields["top_k"] = 0 if req.top_k == -1 else req.top_k
    if req.stop:
        fields["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.stop_token_ids:
        fields["stop_token_ids"] = tuple(req.stop_token_ids)
    if req.seed is not None:
        fields["seed"] = req.seed
    if req.ignore_eos:
        fields["ignore_eos"] = True
    _refuse(bool(req.logit_bias), "logit_bias", "logit_bias is not supported by this engine yet")
    for name, neutral in _PASS_THROUGH.items():
        value = getattr(req, name)
        if value is None or value == neutral:
            continue
        _refuse(name not in ENGINE_FIELDS, name, f"{name} is not supported by this engine yet")
        fields[name] = value
    if not fields:
        return _DEFAULT
    try:
        return SamplingParams.from_dict(fields)
    except InvalidRequestError as e:
        raise _renamed(str(e), {"max_new_tokens": max_tokens_name, "logprobs": logprobs_name}) from None


_DEFAULT = SamplingParams()


def _renamed(message: str, names: Mapping[str, str]) -> APIError:
    """``SamplingParams``' message with the field called what the caller called it."""
    message = message.replace("max_new_tokens", names["max_new_tokens"])
    first, _, rest = message.partition(" ")
    field = first.removesuffix("[]").rstrip(":")
    if field in names.values():
        return invalid(message, field)
    if field in names:
        return invalid(f"{names[field]} {rest}", names[field])
    return invalid(message, field if field in ENGINE_FIELDS else None)


# ---------------------------------------------------------------------------- chat


def chat_prompt(messages: list[Message], allowed_media: str | None) -> Prompt:
    """The SDK prompt map of a chat: ``messages`` (parts as ``text``/``image``) and ``images``."""
    out: list[dict[str, object]] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, str):
            out.append({"role": message.role, "content": content})
            continue
        parts: list[dict[str, str]] = []
        for j, part in enumerate(content):
            if isinstance(part, ImageContent):
                images.append(load_image(part.image_url.url, allowed_media, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        out.append({"role": message.role, "content": parts})
    return {"messages": out, "images": images} if images else {"messages": out}


def load_image(url: str, allowed_media: str | None, where: str) -> bytes:
    """The bytes of an ``image_url``: a ``data:`` URL, or a local file under ``allowed_media``."""
    param = f"{where}.image_url.url"
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64":
            raise invalid("an image data URL must look like data:image/png;base64,<data>", param)
        if media_type and not media_type.startswith("image/"):
            raise invalid(f"a data URL of type {media_type!r} is not an image", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("the image data URL is not valid base64", param) from None
    if url.startswith("file:"):
        return _local_file(unquote(urlsplit(url).path), allowed_media, param)
    raise invalid(
        "image URLs are not fetched: send the image as a data: URL"
        + (" or a file:// URL under the allowed local media path" if allowed_media else ""),
        param,
    )


def _local_file(path: str, allowed_media: str | None, param: str) -> bytes:
    if allowed_media is None:
        raise invalid("file:// images are off (start the front with --allowed-local-media-path)", param)
    real = os.path.realpath(path)
    if os.path.commonpath([real, allowed_media]) != allowed_media or not os.path.isfile(real):
        raise invalid(f"{path!r} is not a file under the allowed local media path", param)
    try:
        with open(real, "rb") as f:
            return f.read()
    except OSError as e:
        raise invalid(f"cannot read {path!r}: {e.strerror}", param) from None
