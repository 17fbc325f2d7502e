"""FastAPI app factory and router. Thin: parse, authenticate, call ``serving``, shape the response."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from autoglm_runtime.engine_api import EngineClient
from autoglm_runtime.metrics import CONTENT_TYPE
from autoglm_runtime.server import errors
from autoglm_runtime.server.admission import AdmissionMiddleware
from autoglm_runtime.server.chat import OpenAIServingChat
from autoglm_runtime.server.completions import OpenAIServingCompletion
from autoglm_runtime.server.generation import EventStream
from autoglm_runtime.server.headers import ResponseHeadersMiddleware
from autoglm_runtime.server.protocol import ChatCompletionRequest, CompletionRequest, ReloadRequest
from autoglm_runtime.server.state import ServerState, StartupError

log = logging.getLogger("autoglm_runtime.server")


def _state(request: Request) -> ServerState:
    return request.app.state.runtime


def _completions(request: Request) -> OpenAIServingCompletion:
    return request.app.state.completions


def _chat(request: Request) -> OpenAIServingChat:
    return request.app.state.chat


async def require_api_key(request: Request) -> None:
    key = _state(request).settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise errors.AuthenticationError()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        result = await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nobody reads it
        result = None
    if isinstance(result, EventStream):  # it finished starting just as the client left
        await result.close()
    log.info("Aborted request after client disconnect, request_id=%s", request.scope["state"].get("request_id"))
    return Response(status_code=499)


class EventStreamResponse(Response):
    """Server-sent events of a started generation. Headers go out at once (the request is admitted, maybe
    still queued); a client that leaves is noticed while no chunk is due; and the generation is closed
    (engine slot freed, in-flight count released) however this ends, even if the body never started."""

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def body() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.stream.body:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sender = asyncio.ensure_future(body())
        watcher = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():
                try:
                    sender.result()
                except OSError:  # the client went away while we wrote
                    pass
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            await self.stream.close()


def _respond(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, EventStream):
        return EventStreamResponse(result)
    return JSONResponse(result.model_dump(mode="json"))


def _json(model: Any) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


router = APIRouter()
authed = [Depends(require_api_key)]


@router.post("/v1/completions", dependencies=authed)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return _respond(await _cancel_on_disconnect(request, _completions(request).create_completion(body)))


@router.post("/v1/chat/completions", dependencies=authed)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return _respond(await _cancel_on_disconnect(request, _chat(request).create_chat_completion(body)))


@router.get("/v1/models", dependencies=authed)
async def models(request: Request) -> Response:
    return _json(_completions(request).models())


@router.get("/health")
async def health(request: Request) -> Response:
    if _state(request).healthy():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


@router.get("/ready")
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.ready():
        return JSONResponse({"status": "ready"})
    if state.draining:
        reason = "draining"
    elif state.startup_error is not None:
        reason = "failed to start"
    else:
        reason = "loading" if not state.started else "engine dead"
    return JSONResponse({"status": reason}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/admin/reload", dependencies=authed)
async def reload(request: Request) -> Response:
    if not _state(request).settings.enable_reload:
        raise errors.PermissionDeniedError(
            "Hot reload over HTTP is disabled (start the server with --enable-reload).", code="reload_disabled"
        )
    raw = await request.body()
    try:
        body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise errors.BadRequestError(f"Invalid reload request: {where}: {first.get('msg')}", param=where) from None
    return JSONResponse(await _state(request).reload(body.model, body.revision))


def create_app(
    state: ServerState,
    make_engine: Callable[[], EngineClient] | None = None,
    on_startup_error: Callable[[StartupError], None] | None = None,
) -> FastAPI:
    """The ASGI app of one server. The lifespan loads the model (``make_engine``, in a worker thread,
    while the port already answers ``/health`` and ``/ready``), starts and stops the engine; readiness
    follows it. A failed load calls ``on_startup_error`` (the CLI stops the server and exits with its code)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await state.load(make_engine)
            except StartupError as exc:
                if on_startup_error is not None:
                    on_startup_error(exc)

        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.stop()
            log.info("Stopped engine")

    app = FastAPI(title="autoglm-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = state
    app.state.completions = OpenAIServingCompletion(state)
    app.state.chat = OpenAIServingChat(state)
    errors.install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(
        AdmissionMiddleware, gate=state.admission, on_reject=lambda: state.metrics.request_finished("rejected")
    )
    app.add_middleware(ResponseHeadersMiddleware, revision=lambda: state.metrics.revision)  # outermost
    return app
