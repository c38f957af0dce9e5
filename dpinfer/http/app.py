"""``create_app(config)``: the ASGI app of one API worker (FastAPI), and its ``/openapi.json``.

The endpoints take the raw ``Request`` and return ready ``Response`` bytes: bodies are decoded
by msgspec (``schemas``) and answers built as dicts or byte templates (``render``), so FastAPI
does routing and documentation only. ``/openapi.json`` describes the bodies with the same
msgspec structs that decode them. Every error, FastAPI's and Starlette's own included (404,
405), is answered in OpenAI's error shape; nothing a client sends is a 500.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from dpinfer.http.auth import Keys
from dpinfer.http.config import HttpConfig, version
from dpinfer.http.control import SIGNALS, ControlRoutes
from dpinfer.http.errors import APIError
from dpinfer.http.link import CoordinatorLink
from dpinfer.http.openai_api import OpenAIRoutes
from dpinfer.http.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    UpdateWeightsRequest,
    openapi_components,
    ref,
)
from dpinfer.log import get_logger

logger = get_logger(__name__)
JSON = "application/json"
_ERRORS = (400, 401, 404, 413, 429, 503)


def create_app(config: HttpConfig, on_ready: Callable[[], None] | None = None) -> ASGIApp:
    """The app of one API worker: its coordinator link starts and stops with the app's lifespan;
    ``on_ready`` is called once the link has had its first look at the deployment."""
    link = CoordinatorLink(config, client_name=f"dpinfer-http-{os.getpid()}")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await link.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await link.stop()

    app = FastAPI(
        title="dpinfer", version=version(), lifespan=lifespan, docs_url="/docs", redoc_url=None,
        description="An OpenAI-compatible front of a dpinfer deployment.",
    )  # fmt: skip
    keys = Keys(config)
    routes = OpenAIRoutes(config, link, keys)
    _add_openai_routes(app, routes)
    _add_control_routes(app, ControlRoutes(config, link, keys))
    _add_error_handlers(app)
    _document(app)
    return FastPath(
        app, {"/v1/completions": routes.completions, "/v1/chat/completions": routes.chat_completions}
    )


class FastPath:
    """``app`` with its hottest ``POST`` endpoints called directly (FastAPI's per-request
    dependency machinery costs as much as the rest of a request); FastAPI still routes every
    other request and documents these."""

    def __init__(self, app: FastAPI, posts: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self._posts = posts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._posts.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except APIError as e:
            response = Response(e.body(), status_code=e.status, media_type=JSON)
        except Exception as e:  # a bug: logged, answered as a 500 in OpenAI's shape
            logger.exception("POST %s failed", scope["path"])
            response = Response(
                APIError(500, f"internal error: {type(e).__name__}").body(), 500, media_type=JSON
            )
        await response(scope, receive, send)


def _body(struct: type | None, streamed: bool = False, success: type | None = None) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": ref(success)}} if success else {JSON: {}}
    if streamed:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    for status in _ERRORS:
        responses[str(status)] = {"description": "Error", "content": {JSON: {"schema": ref(ErrorResponse)}}}
    extra: dict[str, Any] = {"responses": responses}
    if struct is not None:
        extra["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(struct)}}}
    return extra


def _add_openai_routes(app: FastAPI, routes: OpenAIRoutes) -> None:
    app.post("/v1/completions", openapi_extra=_body(CompletionRequest, True, CompletionResponse),
             response_model=None, tags=["openai"])(routes.completions)  # fmt: skip
    app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest, True, ChatCompletionResponse),
             response_model=None, tags=["openai"])(routes.chat_completions)  # fmt: skip
    app.get("/v1/models", openapi_extra=_body(None, success=ModelList), response_model=None,
            tags=["openai"])(routes.models)  # fmt: skip


def _add_control_routes(app: FastAPI, routes: ControlRoutes) -> None:
    for path, endpoint in (
        ("/health", routes.health),
        ("/version", routes.version),
        ("/metrics", routes.metrics),
    ):
        app.get(path, response_model=None, tags=["operations"])(endpoint)
    for name in SIGNALS:
        app.post(f"/{name}", response_model=None, tags=["control"])(routes.signal(name))
    app.post("/update_weights", openapi_extra=_body(UpdateWeightsRequest), response_model=None,
             tags=["control"])(routes.update_weights)  # fmt: skip
    app.api_route("/status", methods=["GET", "POST"], response_model=None, tags=["control"])(routes.status)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return Response(exc.body(), status_code=exc.status, media_type=JSON)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = APIError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )
        return Response(error.body(), status_code=exc.status_code, media_type=JSON, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        return Response(APIError(400, str(exc)).body(), status_code=400, media_type=JSON)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        error = APIError(500, f"internal error: {type(exc).__name__}", code="internal")
        return Response(error.body(), status_code=500, media_type=JSON)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def _document(app: FastAPI) -> None:
    """``/openapi.json`` with the msgspec schemas and the bearer key scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)  # fmt: skip
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(openapi_components())
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, item in schema["paths"].items():
                if path not in ("/health", "/version", "/metrics"):
                    for operation in item.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
