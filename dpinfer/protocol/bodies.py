"""Message bodies: the msgpack maps the coordinator forwards without decoding.

``RequestBody`` (client -> rank) is a frozen ``msgspec.Struct`` with one codec: the client
builds it (``RequestBody.from_builtins`` for untrusted Python values, or the constructor)
and sends ``to_bytes()``; the engine rank's TokenizerProcess decodes it with
``RequestBody.from_bytes``, because peers are untrusted. Both paths run the same checks --
msgspec's type checks, then each struct's ``__post_init__`` -- and raise
``InvalidRequestError`` with one set of messages that name the field, e.g.
``sampling.max_new_tokens must be an integer, got str`` or
``sampling: max_new_tokens must be >= 1, got 0``. What depends on the model (vocabulary,
prompt length, chat template, image decoding and pixel limits) is checked by the rank, in
``dpinfer.tokenizer.request_parsing`` and ``dpinfer.tokenizer.images``.

The request body on the wire is a map; a missing key takes the field's default:

- ``prompt``: str, or a list of token ids (ints >= 0); or
- ``messages``: list of ``{"role": str, "content": str | list of parts}``, a part being
  ``{"type": "text", "text": str}`` or ``{"type": "image"}`` (chat template applied by the rank);
- ``images``: list; each item is encoded image ``bytes`` or a raw array map
  ``{"shape": [h, w, c], "dtype": "uint8", "data": bytes}`` with ``c`` in 1, 3, 4;
- ``sampling``: the ``SamplingParams`` fields that differ from the defaults;
- ``model_inputs``: reserved for precomputed model inputs (no model accepts them yet);
- ``resume``: ``{"token_ids": [...], "text_chars": int}``, a continuation: the request already
  generated these tokens (and streamed that much of their text) elsewhere and goes on from
  there (``Resume``; the coordinator sets it when it migrates a request);
- ``group``: int in ``[0, 2**63)``, the same for the ``n`` completions of one prompt
  (``SamplingParams.n``), each sent as its own body with ``sampling.n`` = 1: the rank
  prefills their prompt once (``scheduler.parallel``). A hint, never trusted for sharing.

``OutputBody`` (rank -> client) is a frozen ``msgspec.Struct`` too, with ``to_bytes``/``from_bytes``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any, TypeAlias

import msgpack
import msgspec

from dpinfer.errors import InvalidRequestError, ProtocolError
from dpinfer.protocol.codec import Frame
from dpinfer.protocol.kinds import FinishReason
from dpinfer.sampling import SamplingParams

_packb = msgpack.Packer(use_bin_type=True).pack


def _raw(frame: Frame) -> bytes | memoryview:
    return frame if isinstance(frame, bytes | memoryview) else frame.buffer


# ---------------------------------------------------------------------------- untyped bodies


def pack_body(data: Mapping[str, object]) -> bytes:
    return _packb(data)


def unpack_body(frame: Frame, what: str = "body") -> dict[str, Any]:
    """An untyped map body (status replies); its values are whatever the sender put there."""
    try:
        data = msgpack.unpackb(_raw(frame), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001
        raise ProtocolError(f"undecodable {what}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a map, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- request body


class TextPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="text", tag_field="type"):
    """A piece of chat message text (``{"type": "text", "text": ...}``)."""

    text: str


class ImagePart(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="image", tag_field="type"):
    """The place of the message's next image (``{"type": "image"}``), like an ``<image>`` mark."""


ContentPart: TypeAlias = TextPart | ImagePart


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One chat turn; the rank renders the model's chat template over the list."""

    role: str
    content: str | tuple[ContentPart, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise InvalidRequestError("role must be a non-empty string")


RAW_IMAGE_CHANNELS = (1, 3, 4)
"""Gray, RGB, RGBA."""


class RawImage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Decoded pixels: a ``uint8`` array of ``shape`` ``[height, width, channels]``, row-major."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype != "uint8":
            raise InvalidRequestError(f"raw image dtype must be 'uint8', got {self.dtype!r}")
        shape = self.shape
        if (
            len(shape) != 3
            or any(type(d) is not int or d <= 0 for d in shape)
            or shape[2] not in RAW_IMAGE_CHANNELS
        ):
            raise InvalidRequestError(
                "raw image shape must be [height, width, channels] with positive sizes and "
                f"1, 3 or 4 channels, got {list(shape)}"
            )
        height, width, channels = shape
        if len(self.data) != height * width * channels:
            raise InvalidRequestError(
                f"raw image data has {len(self.data)} bytes, shape {list(shape)} needs "
                f"{height * width * channels}"
            )


ImageItem: TypeAlias = bytes | RawImage
"""One image as it travels: an encoded file (PNG, JPEG...) or decoded pixels."""

DEFAULT_SAMPLING = SamplingParams()


class Resume(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A continuation (mid-stream migration, or a client resubmitting after a coordinator
    restart): ``token_ids`` were generated already, and ``text_chars`` characters of their
    text reached the client. The rank prefills prompt + ``token_ids`` and streams only what
    follows; the final output holds the whole text and token ids, as if never moved."""

    token_ids: tuple[int, ...]
    text_chars: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise InvalidRequestError("resume.token_ids is empty (omit resume instead)")
        if self.text_chars < 0:
            raise InvalidRequestError(f"resume.text_chars must be >= 0, got {self.text_chars}")
        for i, t in enumerate(self.token_ids):
            if t < 0:
                raise InvalidRequestError(f"resume.token_ids[{i}] = {t} is out of vocabulary")


class RequestBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a client asks of a rank for one request; see the module docstring for the wire form.

    ``__post_init__`` holds every model-independent rule (exactly one of ``prompt`` and
    ``messages``, nothing empty, token ids >= 0). The constructor does not check field
    types (msgspec's contract); build from untrusted values with ``from_builtins``.
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    images: tuple[ImageItem, ...] = ()
    sampling: SamplingParams = DEFAULT_SAMPLING
    model_inputs: dict[str, object] | None = None
    resume: Resume | None = None
    group: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("a request needs exactly one of 'prompt' or 'messages'")
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise InvalidRequestError("prompt is empty")
        elif self.prompt is not None:
            if not self.prompt:
                raise InvalidRequestError("prompt is empty (no token ids)")
            for i, t in enumerate(self.prompt):
                if t < 0:
                    raise InvalidRequestError(f"prompt[{i}] = {t} is out of vocabulary (token ids are >= 0)")
        if self.messages is not None and not self.messages:
            raise InvalidRequestError("messages must be a non-empty list of {role, content} maps")
        for i, image in enumerate(self.images):
            if not isinstance(image, RawImage) and not image:
                raise InvalidRequestError(f"images[{i}]: image bytes are empty")
        if self.sampling.n != 1:
            raise InvalidRequestError(
                "sampling.n: a request body is one completion; send n bodies with one 'group' "
                "(the SDK and the HTTP front do)"
            )
        if self.group is not None and not 0 <= self.group < 1 << 63:
            raise InvalidRequestError(f"group must be in [0, 2**63), got {self.group}")

    def to_bytes(self) -> bytes:
        return _encoder.encode(self)

    @classmethod
    def from_bytes(cls, frame: Frame) -> RequestBody:
        """Decode and check an untrusted body; any problem raises ``InvalidRequestError``."""
        try:
            return _decoder.decode(_raw(frame))
        except msgspec.ValidationError as e:
            raise _invalid(e) from None
        except msgspec.DecodeError as e:
            raise InvalidRequestError(f"undecodable request body: {e}") from None

    @classmethod
    def from_builtins(cls, fields: Mapping[str, object]) -> RequestBody:
        """Build from Python values (lists, dicts, bytes; or the structs themselves) with the
        same checks and messages as ``from_bytes``."""
        try:
            return msgspec.convert(fields, cls)
        except msgspec.ValidationError as e:
            raise _invalid(e) from None


REQUEST_BODY_FIELDS = frozenset(RequestBody.__struct_fields__)
"""Keys of a request body (a msgpack map); see ``RequestBody``."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RequestBody)

# ---------------------------------------------------------------------------- error wording

_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`(?P<key> in `[^`]*`)?)?$", re.DOTALL)
_EXPECTED_GOT = re.compile(r"^Expected (?P<expected>.+?), got (?P<got>.+)$")
_NAMED = re.compile(r"^Object (?P<kind>contains unknown|missing required) field `(?P<name>[^`]*)`$")
_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
    "bytes": "bytes", "array": "a list", "object": "a map", "null": "null",
}  # fmt: skip
_GOT_WORDS = {"array": "list", "object": "map", "None": "null"}
_EXPECTED = {
    "": "a map",
    "prompt": "a string or a list of token ids",
    "prompt[]": "an integer token id",
    "messages": "a non-empty list of {role, content} maps",
    "messages[]": "a {role, content} map",
    "messages[].content": "a string or a list of parts",
    "messages[].content[]": "{'type': 'text', 'text': str} or {'type': 'image'}",
    "messages[].content[].type": "'text' or 'image'",
    "images": "a list of images",
    "images[]": "encoded image bytes or a {shape, dtype, data} map",
    "images[].shape": "[height, width, channels]",
    "sampling": "a map of sampling parameters",
}
"""What a value must be, by field path (list indices as ``[]``), where msgspec's words are
less helpful than these."""
_STRUCTS: dict[str, type[msgspec.Struct]] = {
    "": RequestBody,
    "sampling": SamplingParams,
    "messages[]": ChatMessage,
    "messages[].content[]": TextPart,
    "images[]": RawImage,
    "resume": Resume,
}


def _invalid(error: msgspec.ValidationError) -> InvalidRequestError:
    """msgspec's message (``Expected `int`, got `str` - at `$.sampling.top_k```) in our words."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any string
    what, path = match["what"], (match["path"] or "$").removeprefix("$").removeprefix(".")
    if match["key"]:
        return InvalidRequestError("field names must be strings")
    general = re.sub(r"\[\d+\]", "[]", path)
    where = path or "request body"
    if named := _NAMED.match(what):
        name = named["name"]
        if named["kind"] == "missing required":
            hint = f" (it must be {_EXPECTED[general]})" if general in _EXPECTED else ""
            return InvalidRequestError(f"{where} is missing the field '{name}'{hint}")
        struct = _STRUCTS.get(general)
        valid = f" (valid: {', '.join(sorted(struct.__struct_fields__))})" if struct else ""
        return InvalidRequestError(f"unknown {path or 'request'} field(s): {name}{valid}")
    if typed := _EXPECTED_GOT.match(what):
        got = _words(typed["got"], _GOT_WORDS)
        expected = _EXPECTED.get(general) or _words(typed["expected"], _TYPE_WORDS, " or ")
        return InvalidRequestError(f"{where} must be {expected}, got {got}")
    if what.startswith("Invalid value "):
        expected = _EXPECTED.get(general, "a valid value")
        return InvalidRequestError(f"{where} must be {expected}, got {what.removeprefix('Invalid value ')}")
    return InvalidRequestError(f"{path}: {what}" if path else what)


def _words(msgspec_types: str, words: dict[str, str], joiner: str = " | ") -> str:
    """``"`str | array`"`` as ``"a string or a list"`` (names not in ``words`` kept)."""
    names = [name.strip("` ") for name in msgspec_types.split("|")]
    return joiner.join(words.get(name, name) for name in names)


# ---------------------------------------------------------------------------- output body


class PositionLogprobs(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One position's logprobs, on the wire as ``[ids, values]``: the ``K`` most likely tokens
    (most likely first), then the position's own token if it is not among them."""

    ids: tuple[int, ...]
    values: tuple[float, ...]

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.ids, self.values, strict=True))


class OutputBody(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What a rank sends back for one request (an ``Outputs``/``EngineOutputs`` body).

    Partial (streamed) outputs carry ``delta_text``/``delta_token_ids`` only. The final
    output carries the whole ``text`` and ``token_ids``, plus for streamed requests the
    last ``delta_text``/``delta_token_ids`` not yet sent, and the counters. A request that
    ends without its result has ``finish_reason`` ``error`` or ``abort``, a human ``error`` and
    a machine ``error_code`` (``ErrorCode``) that front ends map to a status (429, 503, ...).

    Logprobs (only when the request asked): ``logprobs`` has one entry per token of
    ``delta_token_ids`` (partial) or of ``token_ids`` (final; a streamed request's last delta
    is its tail; a continuation's final, of the tokens it generated itself: the last ones,
    the SDK puts the streamed ones in front); ``prompt_logprobs`` (final only) one per prompt
    token after the first; ``token_texts`` the text of every id they name.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    delta_text: str = ""
    delta_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_reason: str | int | None = None
    """The matched stop string or ``stop_token_ids`` id (``None`` for EOS), see ``GenerationResult``."""
    logprobs: tuple[PositionLogprobs, ...] | None = None
    prompt_logprobs: tuple[PositionLogprobs, ...] | None = None
    token_texts: dict[int, str] | None = None

    def to_bytes(self) -> bytes:
        return _encode_output(self)

    @classmethod
    def from_bytes(cls, frame: Frame) -> OutputBody:
        try:
            return _decode_output(_raw(frame))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise ProtocolError(f"output body: {e}") from None


_encode_output = msgspec.msgpack.Encoder().encode
_decode_output = msgspec.msgpack.Decoder(OutputBody).decode


class ErrorCode(enum.StrEnum):
    """Why a request ended without its result, for machines (``OutputBody.error_code``)."""

    INVALID_REQUEST = "invalid_request"
    """The request itself is wrong (HTTP 400)."""
    OVERLOADED = "overloaded"
    """A queue limit was reached; retry later (HTTP 429)."""
    UNAVAILABLE = "unavailable"
    """No rank can serve it now: none is live, the deployment is stopped, a rank failed (HTTP 503)."""
    ABORTED = "aborted"
    """The client aborted it, or the rank stopped before it finished."""
    INTERNAL = "internal"
    """A bug on the serving side; the message says where."""


def error_body(
    message: str, reason: FinishReason = FinishReason.ERROR, code: ErrorCode | None = None
) -> bytes:
    """The final output body of a request that ends without generating (error, abort)."""
    if code is None:
        code = ErrorCode.ABORTED if reason is FinishReason.ABORT else ErrorCode.UNAVAILABLE
    return OutputBody(finish_reason=reason.value, error=message, error_code=code.value).to_bytes()
