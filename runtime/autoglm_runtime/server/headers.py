"""Headers on every response: which request it answers and which revision answered it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
REVISION_HEADER = "x-autoglm-revision"


class ResponseHeadersMiddleware:
    """Every response names the request and the revision that answered it (pure ASGI: streaming-safe).

    ``x-request-id`` is accepted from the client or generated; ``x-autoglm-revision`` is the server's
    ``revision`` (the same value as the metrics' ``revision`` label, read when the response starts, so a
    hot reload to a new revision shows on the next response). Clients and tests see who answered during
    a canary rollout.
    """

    def __init__(self, app: ASGIApp, revision: Callable[[], str]) -> None:
        self.app = app
        self.revision = revision

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                rid = value.decode("latin-1")[:256]
                break
        rid = rid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["revision"] = rid, self.revision

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_identity(message.get("headers", []), rid, self.revision())}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def with_identity(headers: Iterable[tuple[bytes, bytes]], request_id: str, revision: str) -> list[tuple[bytes, bytes]]:
    """``headers`` with this server's ``x-request-id`` and ``x-autoglm-revision`` (replacing any)."""
    ours = {REQUEST_ID_HEADER.encode(): request_id, REVISION_HEADER.encode(): revision}
    kept = [(k, v) for k, v in headers if k.lower() not in ours]
    return kept + [(k, v.encode("latin-1")) for k, v in ours.items()]


def identity_headers(request: Request) -> dict[str, str]:
    """The same headers for a response made outside the middleware (Starlette's last-resort 500 handler
    sends on the server's own ``send``, around every middleware)."""
    state = request.scope.get("state", {})
    revision = state.get("revision")
    headers = {REQUEST_ID_HEADER: state.get("request_id") or uuid.uuid4().hex}
    return {**headers, REVISION_HEADER: revision()} if revision is not None else headers
