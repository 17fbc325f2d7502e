"""The router's own error answers, in the runtime's (OpenAI's) body shape:
``{"error": {"message", "type", "param", "code"}}``. Bad input is a 4xx, never a 5xx."""

from __future__ import annotations

import json

from aiohttp import web


def error_response(
    status: int, message: str, error_type: str, code: str | None = None, param: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def malformed_json(detail: str) -> web.Response:
    """What the runtime answers to a body that is not JSON (its ``json_invalid`` validation error)."""
    return error_response(400, f"Malformed JSON body: {detail}", "invalid_request_error", "invalid_value")


def too_large(limit: int) -> web.Response:
    return error_response(
        413, f"The request body is larger than {limit} bytes.", "invalid_request_error", "request_too_large"
    )


def no_endpoints() -> web.Response:
    return error_response(
        503,
        "No Ready model pod is available; retry later.",
        "service_unavailable_error",
        "no_endpoints",
        **{"Retry-After": "1"},
    )


def not_held(reason: str, retry_after: int) -> web.Response:
    """No Ready pod, and the request could not wait for one (``full``: the hold queue is full; ``off``:
    holding is off) or waited its whole hold timeout (``timeout``)."""
    why = {
        "full": "too many requests are already waiting for one",
        "off": "requests are not held",
        "timeout": "none turned Ready within the hold timeout",
    }[reason]
    return error_response(
        503,
        f"No Ready model pod is available ({why}); retry later.",
        "service_unavailable_error",
        "no_endpoints" if reason == "off" else f"hold_{reason}",
        **{"Retry-After": str(retry_after)},
    )


def upstream_failed(detail: str) -> web.Response:
    return error_response(
        502, f"Every model pod tried failed: {detail}", "service_unavailable_error", "upstream_failed"
    )
