"""Images over the OpenAI chat API on `dpinfer serve --model tiny-llava --dp 1`: a data: URL
and a file:// URL under --allowed-local-media-path are served; a remote URL, a file outside
the allowed path and bytes that are no image are 400s."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from conftest import ServeProcess

MODEL = "tiny-llava"


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    (directory / "blue.png").write_bytes(_png((0, 0, 255)))
    return directory


@pytest.fixture(scope="module")
def api(serve_process: Callable[[list[str]], ServeProcess], media: Path) -> Iterator[openai.OpenAI]:
    served = serve_process(["--model", MODEL, "--dp", "1", "--http-port", "0",
                            "--allowed-local-media-path", str(media)])  # fmt: skip
    with openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _ask(api: openai.OpenAI, url: str) -> str:
    reply = api.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What color is this?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 64, "the 64 image tokens are missing"
    return reply.choices[0].message.content or ""


def test_an_image_by_data_url_and_by_an_allowed_local_file(api: openai.OpenAI, media: Path) -> None:
    blue = base64.b64encode(_png((0, 0, 255))).decode()
    by_data = _ask(api, f"data:image/png;base64,{blue}")
    by_file = _ask(api, (media / "blue.png").as_uri())
    assert by_data == by_file, "the same image gave different greedy answers"
    red = base64.b64encode(_png((255, 0, 0))).decode()
    assert _ask(api, f"data:image/png;base64,{red}") != by_data, "the image made no difference"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://example.com/cat.png", "not fetched"),
        ("file:///etc/hostname", "not a file under the allowed local media path"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot decode image"),
    ],
)
def test_images_that_cannot_be_used_are_400(api: openai.OpenAI, url: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError, match=words):
        _ask(api, url)
