"""Admission before the engine's queue: a full server answers 429 before it decodes anything.

Between arrival and the engine's queue a request costs the server work the engine cannot bound: its
body is read and parsed, its images base64-decoded and decompressed, its prompt templated and
tokenized. ``AdmissionMiddleware`` counts every generation request from arrival to the end of its
response (``Ticket``) and refuses one at the door, with an OpenAI-shaped 429 and ``Retry-After``,
when either

- the requests in progress reach the engine's capacity (``max_batch_size + max_queue``: the engine
  would refuse it anyway, after the server had decoded it), or
- the requests not yet in the engine's queue reach ``--max-pending-requests``.

A refused request's body is read and dropped (so the client sees the 429 rather than a reset
connection) and never parsed. ``Ticket.queued()`` is called once the engine has accepted the request
(``serving._start``); the middleware finds the ticket through a context variable it sets.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from autoglm_runtime.server import errors

GATED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

_current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("autoglm_admission_ticket", default=None)


class AdmissionGate:
    """Counts generation requests in progress and those of them not yet in the engine's queue."""

    def __init__(self, capacity: int, pending_limit: int) -> None:
        self.capacity = capacity
        self.pending_limit = pending_limit
        self.in_progress = 0
        self.pending = 0

    def enter(self) -> Ticket | None:
        """A ticket, or None when the server is full."""
        if self.in_progress >= self.capacity or self.pending >= self.pending_limit:
            return None
        self.in_progress += 1
        self.pending += 1
        return Ticket(self)


class Ticket:
    """One admitted request: ``queued()`` when the engine accepted it, ``release()`` when it ended
    (both idempotent)."""

    __slots__ = ("gate", "is_pending", "released")

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate
        self.is_pending = True
        self.released = False

    def queued(self) -> None:
        if self.is_pending:
            self.is_pending = False
            self.gate.pending -= 1

    def release(self) -> None:
        self.queued()
        if not self.released:
            self.released = True
            self.gate.in_progress -= 1


def mark_queued() -> None:
    """Tell the gate that the current request reached the engine's queue (no-op outside a gated request)."""
    ticket = _current.get()
    if ticket is not None:
        ticket.queued()


class AdmissionMiddleware:
    """Pure ASGI middleware (it must run before FastAPI reads the body)."""

    def __init__(self, app: ASGIApp, gate: AdmissionGate, on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.gate = gate
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GATED_PATHS:
            await self.app(scope, receive, send)
            return
        ticket = self.gate.enter()
        if ticket is None:
            if self.on_reject is not None:
                self.on_reject()
            await _drop_body(receive)
            await _send_error(send, errors.QueueFullAPIError())
            return
        token = _current.set(ticket)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
            ticket.release()


async def _drop_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _send_error(send: Send, exc: errors.APIError) -> None:
    body = json.dumps(errors.error_body(exc.message, exc.error_type, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
