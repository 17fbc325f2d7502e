"""Typed errors of the HTTP layer and the ONE place that maps them to status codes.

Every error body is OpenAI's: ``{"error": {"message", "type", "param", "code"}}``. User input never
produces a 500: request validation and malformed JSON are 400; only real bugs reach the catch-all.
The engine's typed errors (``engine_api.EngineError``, ``loader.ModelLoadError``) become API errors in
``from_engine`` and nowhere else.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoglm_runtime.engine_api import (
    EngineDeadError,
    EngineDrainingError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
)
from autoglm_runtime.loader import InsufficientMemoryError, ModelLoadError
from autoglm_runtime.server.headers import identity_headers

log = logging.getLogger("autoglm_runtime.server")


class APIError(Exception):
    """Base of errors answered to the client. Subclasses fix the status and the OpenAI error type."""

    status_code = 500
    error_type = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(BadRequestError):
    """Unknown ``model`` in the request. OpenAI answers 404 here; vLLM and we answer 400 (bad param)."""

    def __init__(self, model: str, served: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist; this server serves `{served}`.", param="model", code="model_not_found"
        )


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"

    def __init__(self, message: str = "Invalid or missing API key (expected `Authorization: Bearer <key>`).") -> None:
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"


class ConflictError(APIError):
    status_code = 409
    error_type = "conflict_error"


class QueueFullAPIError(APIError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__(
            "The server's request queue is full; retry later.",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable_error"

    def __init__(self, message: str, *, code: str = "unavailable", retry_after: int | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)} if retry_after else None)


class DrainingError(ServiceUnavailableError):
    def __init__(self) -> None:
        super().__init__("The server is shutting down and accepts no new requests.", code="draining")


class RequestTimeoutError(APIError):
    """The request ran past ``--request-timeout``; it was aborted and its engine slot freed."""

    status_code = 504
    error_type = "timeout_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_timeout")


class InternalError(APIError):
    status_code = 500
    error_type = "internal_error"


def from_engine(exc: EngineError | ModelLoadError) -> APIError:
    """The HTTP error for one of the engine's documented errors (the only such mapping)."""
    if isinstance(exc, QueueFullError):
        return QueueFullAPIError()
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineDrainingError):
        return DrainingError()
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(f"The inference engine is not running: {exc}", code="engine_dead")
    # Reload only (ModelLoadError): the old model keeps serving.
    if isinstance(exc, InsufficientMemoryError):
        return ConflictError(f"Cannot load the model: {exc}", param="model", code="insufficient_memory")
    if isinstance(exc, ModelLoadError):
        return BadRequestError(f"Cannot load the model: {exc}", param="model", code="model_load_failed")
    return InternalError(f"Unexpected engine error: {type(exc).__name__}")


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code), status_code=exc.status_code, headers=exc.headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request.", None
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if param:
        msg = f"{param}: {msg}"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return msg, param


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to an OpenAI-style error body. Call once from the app factory."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (404 unknown path, 405 wrong method) and FastAPI's own body errors.
        status = exc.status_code if exc.status_code != 422 else 400
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "invalid_request_error")
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=status, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Failed request with an unexpected error, path=%s", request.url.path)
        return JSONResponse(
            error_body("Internal server error.", "internal_error", None, None),
            status_code=500,
            headers=identity_headers(request),
        )
