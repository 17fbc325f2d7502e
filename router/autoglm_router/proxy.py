"""The ``/v1/*`` reverse proxy: check the body, pick a pod, retry what is safe to retry, stream the answer.

One request's path: ``authenticate`` (``auth.hook`` for OAuth2: its verified user replaces the body's
``user`` for picking and is sent to the pod as ``x-autoglm-user``; the token itself is not) → read the
body (over ``max_body_bytes``: 413) → parse it when it is a POST (not JSON: the runtime's 400, without
reaching a pod) → while no revision has a Ready pod, wait in the ``HoldQueue`` (scale to zero; full or
timed out: a 503 with ``Retry-After``) → ``Picker.choose`` → send to the pod. A connect failure, a
connection reset before the response headers, or a 503 (a draining pod, a dead engine) is retried on
another pod, at most ``MAX_RETRIES`` times and only before any byte went to the client; once the
response started it is passed on chunk by chunk as it arrives (server-sent events are never buffered),
and never retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from autoglm_router import errors
from autoglm_router.endpoints import EndpointSource
from autoglm_router.hold import HoldQueue, HoldRefused, HoldTimedOut
from autoglm_router.metrics import RouterMetrics, user_bucket
from autoglm_router.picker import Choice, NoEndpoints, Picker
from autoglm_router.sessions import USER_HEADER
from autoglm_router.tls import PLAIN, Upstream

log = logging.getLogger("autoglm_router.proxy")

MAX_RETRIES = 2
RETRY_AFTER_NOT_HELD = 5  # seconds a client that could not be held is told to wait
POD_HEADER = "x-autoglm-pod"
REQUEST_ID_HEADER = "x-request-id"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server"}

# An error answer, or None to let the request through (``auth.hook.bearer_hook`` is the OAuth2 one); a
# hook that verified who calls leaves the user under ``VERIFIED_USER`` on the request.
VERIFIED_USER = web.RequestKey("autoglm_verified_user", str)
AUTH_RESULT = web.RequestKey("autoglm_auth_result", str)  # one of metrics.AUTH_RESULTS, set by a token check
Authenticate = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


async def allow_all(_: web.Request) -> web.StreamResponse | None:
    return None


@dataclass
class _Unavailable:
    status: int
    headers: CIMultiDict[str]
    body: bytes


class Proxy:
    def __init__(
        self,
        source: EndpointSource,
        picker: Picker,
        metrics: RouterMetrics,
        max_body_bytes: int,
        authenticate: Authenticate = allow_all,
        connect_timeout: float = 2.0,
        hold: HoldQueue | None = None,
        upstream: Upstream = PLAIN,
    ) -> None:
        self.source = source
        self.picker = picker
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.authenticate = authenticate
        self.connect_timeout = connect_timeout
        self.hold = hold or HoldQueue(timeout=0, capacity=0)
        self.upstream = upstream
        self._upstream_kwargs = upstream.request_kwargs()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection limit (the pods' own admission answers 429), bytes passed through as they are.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _answer(self, response: web.StreamResponse, revision: str = "none") -> web.StreamResponse:
        self.metrics.requests.labels(revision, str(response.status)).inc()
        return response

    async def _read_body(self, request: web.Request) -> bytes | None:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return None
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        denied = await self.authenticate(request)
        result = request.get(AUTH_RESULT)
        if result is not None:
            self.metrics.auth.labels(result).inc()
        if denied is not None:
            return self._answer(denied)
        body = await self._read_body(request)
        if body is None:
            return self._answer(errors.too_large(self.max_body_bytes))
        parsed: dict = {}
        if request.method == "POST" and body.strip():
            try:
                value = json.loads(body)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                return self._answer(errors.malformed_json(str(exc)))
            parsed = value if isinstance(value, dict) else {}  # the pod answers a non-object with its 400
        headers = self._forward_headers(request)
        user = request.get(VERIFIED_USER)
        if user is not None:  # who the token says, not what the client wrote, picks the revision
            parsed = {**parsed, "user": user}
            headers[USER_HEADER] = user
            headers.popall("authorization", None)
            self.metrics.user_requests.labels(user_bucket(user)).inc()
        topo = self.source.topology()
        meant_for = next((r.name for r in self.picker.revision_for(topo, request.headers, parsed)), "")
        try:
            held = await self.hold.wait(meant_for, lambda: bool(self.source.topology().endpoints()))
        except HoldRefused as exc:
            retry_after = 1 if exc.reason == "off" else RETRY_AFTER_NOT_HELD
            return self._answer(errors.not_held(exc.reason, retry_after))
        except HoldTimedOut:
            self.metrics.hold_seconds.observe(self.hold.timeout)
            log.warning("Timed out holding request, revision=%s timeout_s=%.0f", meant_for, self.hold.timeout)
            return self._answer(errors.not_held("timeout", RETRY_AFTER_NOT_HELD))
        if held:
            self.metrics.hold_seconds.observe(held)
            log.info("Released held request, revision=%s held_s=%.3f", meant_for, held)
        self.metrics.inflight.inc()
        try:
            return await self._send(request, body, parsed, headers, started + held)
        finally:
            self.metrics.inflight.dec()

    def _forward_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        headers.setdefault(REQUEST_ID_HEADER, uuid.uuid4().hex)
        peer = request.remote
        if peer:
            prior = request.headers.get("x-forwarded-for")
            headers["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
        return headers

    async def _send(
        self, request: web.Request, body: bytes, parsed: dict, headers: CIMultiDict[str], started: float
    ) -> web.StreamResponse:
        assert self._session is not None, "Proxy.start() was not awaited"
        tried: set[str] = set()
        waited = 0.0  # time spent waiting on pods (not the router's own)
        unavailable: _Unavailable | None = None
        failure = ""
        topo = self.source.topology()
        for attempt in range(MAX_RETRIES + 1):
            try:
                choice = self.picker.choose(topo, request.headers, parsed, frozenset(tried))
            except NoEndpoints:
                break
            tried.add(choice.endpoint.address)
            self.metrics.picks.labels(choice.policy).inc()
            if choice.moved:
                self.metrics.sessions_moved.inc()
            self.picker.started(choice.endpoint)
            sent = time.perf_counter()
            try:
                upstream = await self._session.request(
                    request.method,
                    URL(self.upstream.url(choice.endpoint) + request.rel_url.raw_path_qs, encoded=True),
                    headers=headers,
                    data=body if body else None,
                    allow_redirects=False,
                    **self._upstream_kwargs,
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                waited += time.perf_counter() - sent
                self.picker.finished(choice.endpoint)
                self.picker.failed(choice.endpoint)
                reason = "connect" if isinstance(exc, aiohttp.ClientConnectorError | TimeoutError) else "reset"
                failure = f"{choice.endpoint.pod}: {type(exc).__name__}: {exc}"
                log.warning(
                    "Failed to reach pod, pod=%s attempt=%d reason=%s error=%s",
                    choice.endpoint.pod,
                    attempt,
                    reason,
                    exc,
                )
                if attempt < MAX_RETRIES:
                    self.metrics.retries.labels(reason).inc()
                continue
            except asyncio.CancelledError:  # the client left before the pod answered (handler cancellation)
                self.picker.finished(choice.endpoint)
                raise
            waited += time.perf_counter() - sent
            if upstream.status == 503:
                try:
                    unavailable = _Unavailable(upstream.status, CIMultiDict(upstream.headers), await upstream.read())
                except aiohttp.ClientError:
                    unavailable = None
                finally:
                    upstream.release()
                    self.picker.finished(choice.endpoint)
                log.info("Pod answered 503, pod=%s attempt=%d", choice.endpoint.pod, attempt)
                if attempt < MAX_RETRIES:
                    self.metrics.retries.labels("unavailable").inc()
                continue
            try:
                return await self._stream(request, upstream, choice, started, waited)
            finally:
                self.picker.finished(choice.endpoint)
        if unavailable is not None:
            resp = web.Response(status=unavailable.status, body=unavailable.body)
            for k, v in unavailable.headers.items():
                if k.lower() not in RESPONSE_DROPPED:
                    resp.headers.add(k, v)
            return self._answer(resp)
        if failure:
            return self._answer(errors.upstream_failed(failure))
        return self._answer(errors.no_endpoints())

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, choice: Choice, started: float, waited: float
    ) -> web.StreamResponse:
        """Pass the pod's response on as its bytes arrive. Past this point nothing is retried."""
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in RESPONSE_DROPPED:
                resp.headers.add(k, v)
        resp.headers[POD_HEADER] = choice.endpoint.pod
        if upstream.content_length is not None and "chunked" not in upstream.headers.get("transfer-encoding", ""):
            resp.content_length = upstream.content_length
        completed = False
        try:
            await resp.prepare(request)
            self.metrics.added_latency.observe(max(0.0, time.perf_counter() - started - waited))
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            completed = True
        except ConnectionResetError:
            log.info("Client went away mid-response, pod=%s", choice.endpoint.pod)
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()  # the pod sees the disconnect and frees the request's slot
            self.metrics.requests.labels(choice.revision, str(upstream.status)).inc()
        return resp
