"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

One HTTP request becomes one engine request per choice (prompts times ``n``), submitted
together through the worker's ``AsyncInferenceClient``; the ``n`` completions of a prompt
go as one group, so their rank prefills the prompt once. A non-streamed request answers when
every choice is done; a streamed one answers once its first output (or failure) arrives, so a
request the rank refuses still gets its own status code, then streams SSE chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from dpinfer.client.async_client import AsyncInferenceClient
from dpinfer.client.handles import RequestFuture, RequestStream
from dpinfer.errors import ConnectionLostError, InvalidRequestError
from dpinfer.http.auth import Keys
from dpinfer.http.config import HttpConfig
from dpinfer.http.connection import DisconnectWatch, abort_soon, read_body
from dpinfer.http.decoding import decode
from dpinfer.http.errors import invalid, result_error, unavailable
from dpinfer.http.inputs import Choice, Prompt, chat_choices, completion_choices
from dpinfer.http.link import CoordinatorLink
from dpinfer.http.render import Reply, encode_json
from dpinfer.http.schemas import ChatCompletionRequest, CompletionRequest
from dpinfer.http.sse import EventStream, first_event
from dpinfer.outputs import GenerationResult, Routing
from dpinfer.sampling import SamplingParams

JSON = "application/json"


class OpenAIRoutes:
    """The OpenAI endpoints of one API worker."""

    def __init__(self, config: HttpConfig, link: CoordinatorLink, keys: Keys) -> None:
        self.config = config
        self.link = link
        self.keys = keys

    async def completions(self, request: Request) -> Response:
        self.keys.check_api(request)
        req = decode(await read_body(request, self.config.max_body_bytes), CompletionRequest)
        model = self.link.model_name(req.model)
        choices = completion_choices(req, self.config.max_choices)
        reply = Reply(False, model, top_logprobs=req.logprobs)
        return await self._serve(request, reply, choices, req.n, req, "prompt")

    async def chat_completions(self, request: Request) -> Response:
        self.keys.check_api(request)
        req = decode(await read_body(request, self.config.max_body_bytes), ChatCompletionRequest)
        model = self.link.model_name(req.model)
        choices = chat_choices(req, self.config.allowed_local_media_path, self.config.max_choices)
        reply = Reply(True, model, top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return await self._serve(request, reply, choices, req.n, req, "messages")

    async def models(self, request: Request) -> Response:
        self.keys.check_api(request)
        data = [
            {"id": name, "object": "model", "created": self.link.created, "owned_by": "dpinfer"}
            for name in self.link.served_names
        ]
        return Response(encode_json({"object": "list", "data": data}), media_type=JSON)

    # ------------------------------------------------------------------ serving

    async def _serve(
        self, request: Request, reply: Reply, choices: list[Choice], n: int,
        req: CompletionRequest | ChatCompletionRequest, prompt_param: str,
    ) -> Response:  # fmt: skip
        client = self.link.require()
        if req.stream:
            streams = _submit(client, client.add_parallel_requests_streaming, choices, prompt_param)
            return await self._stream(request, client, reply, streams, n, req)
        futures = _submit(client, client.add_parallel_requests, choices, prompt_param)
        watch = DisconnectWatch(request.receive, client, [f.request_id for f in futures])
        try:
            results = await futures[0] if len(futures) == 1 else await _gather(client, futures)
        except ConnectionLostError as e:
            raise unavailable(f"lost the coordinator: {e}") from None
        finally:
            watch.close()
        if isinstance(results, GenerationResult):
            if not results.ok:
                raise result_error(results)
            return Response(reply.response((results,), 1), media_type=JSON, headers=_routing((results,)))
        for result in results:
            if not result.ok:
                raise result_error(result)
        return Response(reply.response(results, n), media_type=JSON, headers=_routing(results))

    async def _stream(
        self, request: Request, client: AsyncInferenceClient, reply: Reply, streams: list[RequestStream],
        n: int, req: CompletionRequest | ChatCompletionRequest,
    ) -> Response:  # fmt: skip
        watch = DisconnectWatch(request.receive, client, [s.request_id for s in streams])
        try:
            events = first_event(streams)
            first = await anext(events)
        except ConnectionLostError as e:
            watch.close()
            raise unavailable(f"lost the coordinator: {e}") from None
        except BaseException:
            watch.close()
            raise
        _, delta = first
        if delta.finished and delta.result is not None and not delta.result.ok:
            watch.close()
            await events.aclose()
            _abort_all(client, streams)
            raise result_error(delta.result)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        routing = delta.routing or (delta.result.routing if delta.result is not None else None)
        headers = _routing_header([routing])
        return EventStream(
            reply, include_usage, n, len(streams), first, events, watch, client, streams, headers
        )


H = TypeVar("H", RequestFuture, RequestStream)
ROUTING_HEADER = "x-dpinfer-routing"
"""Where the hub sent each choice and why (``GenerationResult.routing``), comma-separated. A
streamed response sends its headers with its first chunk: there it names the choice whose
output came first (``StreamDelta.routing``; with ``n`` > 1 the others had not started yet)."""


def _routing(results: Sequence[GenerationResult]) -> dict[str, str]:
    return _routing_header([r.routing for r in results])


def _routing_header(routings: Sequence[Routing | None]) -> dict[str, str]:
    values = [r.header() for r in routings if r is not None]
    return {ROUTING_HEADER: ", ".join(values)} if values else {}


def _submit(
    client: AsyncInferenceClient, add: Callable[[Prompt, SamplingParams], list[H]], choices: Sequence[Choice],
    prompt_param: str,
) -> list[H]:  # fmt: skip
    """Queue one engine request per choice (``n`` per prompt); a prompt the SDK refuses is a
    400 (nothing runs)."""
    handles: list[H] = []
    try:
        for choice in choices:
            handles.extend(add(choice.prompt, choice.sampling))
    except InvalidRequestError as e:
        _abort_all(client, handles)
        raise invalid(e, prompt_param) from None
    except OverflowError:  # an integer (seed, token id) beyond 64 bits, met by the body's encoder
        _abort_all(client, handles)
        raise invalid("an integer parameter is out of range (64 bits at most)") from None
    except ConnectionLostError as e:
        _abort_all(client, handles)
        raise unavailable(f"lost the coordinator: {e}") from None
    return handles


def _abort_all(client: AsyncInferenceClient, handles: Sequence[RequestFuture | RequestStream]) -> None:
    for handle in handles:
        if isinstance(handle, RequestFuture):
            handle.cancel()
    abort_soon(client, [h.request_id for h in handles])


async def _gather(client: AsyncInferenceClient, futures: list[RequestFuture]) -> list[GenerationResult]:
    """Every choice's result, in order; the first failure aborts the others and is raised."""
    for done in asyncio.as_completed(futures):
        result = await done
        if not result.ok:
            abort_soon(client, [f.request_id for f in futures if not f.done()])
            raise result_error(result)
    return [f.result() for f in futures]
