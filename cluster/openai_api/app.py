"""The FastAPI app: routes, the request-id middleware and the error handlers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.engine.frontend import Tokenizer
from cluster.engine_client import HEALTH_STALL_SECONDS, EngineClient
from cluster.openai_api.errors import APIError, ClientDisconnected, engine_error, error_body
from cluster.openai_api.responses import ResponsesAPI
from cluster.openai_api.server import MAX_BODY_BYTES, OpenAIServer

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Takes `x-request-id` from the request (or makes one), puts it on every response.

    `echo=False` where a proxy in front already echoes it (Ray Serve's does).
    """

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if self.echo and message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(
    client: EngineClient,
    tokenizer: Tokenizer,
    api_key: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    health_stall_s: float = HEALTH_STALL_SECONDS,
    echo_request_id: bool = True,
    tool_call_parser: str = "hermes",
    reasoning_parser: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `client`; `app.state.openai` is its `OpenAIServer`.

    `api_key`: when set, /v1/* requests need `Authorization: Bearer <api_key>` (as vLLM).
    `health_stall_s`: /health fails when no engine made progress for this long.
    `echo_request_id`: False behind a proxy that already echoes `x-request-id` (Ray Serve).
    `tool_call_parser`: how chat outputs are read for tool calls (`cluster.openai_api.tools`).
    `reasoning_parser`: how chat outputs are read for reasoning (`cluster.openai_api.reasoning`); None: not, the
    output is all content.
    """
    server = OpenAIServer(client, tokenizer, api_key, max_body_bytes, health_stall_s, tool_call_parser,
                          reasoning_parser)
    app = FastAPI(title="semipd OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.openai = server
    responses = ResponsesAPI(server)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return engine_error(exc).response()

    routes: list[tuple[str, Callable[..., Awaitable[Response]], list[str]]] = [
        ("/v1/completions", server.completions, ["POST"]),
        ("/v1/chat/completions", server.chat_completions, ["POST"]),
        ("/v1/responses", responses.create, ["POST"]),
        ("/v1/responses/{response_id}", responses.retrieve, ["GET", "DELETE"]),
        ("/v1/responses/{response_id}/cancel", responses.retrieve, ["POST"]),
        ("/v1/models", server.models, ["GET"]),
        ("/tokenize", server.tokenize, ["POST"]),
        ("/detokenize", server.detokenize, ["POST"]),
    ]
    for path, handler, methods in routes:
        app.add_api_route(path, handler, methods=methods)
    app.add_api_route("/invocations", server.invocations, methods=["POST"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/ping", server.health, methods=["GET", "POST"])  # SageMaker's health check, as vLLM's
    app.add_api_route("/version", server.version, methods=["GET"])
    app.add_api_route("/splits", server.splits, methods=["GET"])
    app.add_api_route("/reset_prefix_cache", server.reset_prefix_cache, methods=["POST"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"], include_in_schema=False)
    return app

