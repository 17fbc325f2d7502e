"""The router's aiohttp application: ``/v1/*`` through the proxy, ``/healthz``, ``/ready``, ``/metrics``,
``/status`` (how token checking stands: the issuer's keys, or why they cannot be fetched)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from autoglm_router.auth.hook import bearer_hook
from autoglm_router.auth.keys import IssuerKeys
from autoglm_router.auth.verify import BearerVerifier
from autoglm_router.endpoints import EndpointSource
from autoglm_router.hold import HoldQueue
from autoglm_router.metrics import CONTENT_TYPE, RouterMetrics
from autoglm_router.picker import Picker
from autoglm_router.proxy import Authenticate, Proxy, allow_all
from autoglm_router.queues import QueueScraper
from autoglm_router.tls import PLAIN, Upstream

log = logging.getLogger("autoglm_router.app")
# The issuer's keys are refetched this often besides on an unknown kid: a rotation is seen before the first
# token signed with the new key arrives, and an issuer gone away shows in /status and the metrics.
KEYS_REFRESH_SECONDS = 60.0


def auth_status(verifier: BearerVerifier | None) -> dict[str, Any] | None:
    """``/status``'s ``auth``: None when tokens are not checked."""
    if verifier is None:
        return None
    keys = verifier.keys
    return {
        "issuer": verifier.config.issuer_url,
        "reachable": keys.reachable,
        "keys": len(keys.key_ids),
        "message": keys.status,
    }


ReportKeys = Callable[[IssuerKeys], Awaitable[None]]


async def keep_keys_fresh(verifier: BearerVerifier, period: float, report: ReportKeys | None) -> None:
    """Fetch the issuer's keys at start (the first token is not slowed by it) and every ``period``; after
    each try, ``report`` how they stand (``auth.report``: a condition on the router's pod)."""
    while True:
        if not await verifier.keys.refresh(force=True):
            log.warning("Failed to fetch the issuer's keys, status=%s", verifier.status)
        if report is not None:
            await report(verifier.keys)
        await asyncio.sleep(period)


@dataclass
class RouterState:
    source: EndpointSource
    picker: Picker
    metrics: RouterMetrics
    proxy: Proxy
    scraper: QueueScraper | None
    hold: HoldQueue
    draining: bool = False


STATE = web.AppKey("autoglm_router_state", RouterState)


def create_app(
    source: EndpointSource,
    picker: Picker,
    *,
    max_body_bytes: int = 64 * 1024 * 1024,
    queue_scrape_interval: float = 1.0,
    authenticate: Authenticate = allow_all,
    deployment: str = "",
    hold_timeout: float = 0.0,
    hold_capacity: int = 1024,
    verifier: BearerVerifier | None = None,
    keys_refresh_s: float = KEYS_REFRESH_SECONDS,
    report_keys: ReportKeys | None = None,
    upstream: Upstream = PLAIN,
) -> web.Application:
    """The app. ``hold_timeout`` 0 (the default here; the CLI's is 120 s) answers a request that finds no
    Ready pod with a 503 at once instead of holding it. ``verifier``: check bearer tokens with it
    (``authenticate`` is then its hook), show its state on ``/status`` and ``/metrics``, and pass it to
    ``report_keys`` after each refresh. ``upstream``: how to call the pods (plain HTTP, or HTTPS verified
    as ``tls`` says), for proxied requests and queue-depth scrapes alike."""
    if verifier is not None:
        authenticate = bearer_hook(verifier)
    metrics = RouterMetrics(deployment, oauth2=verifier is not None)
    hold = HoldQueue(hold_timeout, hold_capacity, lambda rev: metrics.held.labels(deployment, rev))
    source.subscribe(hold.notify)
    proxy = Proxy(source, picker, metrics, max_body_bytes, authenticate, hold=hold, upstream=upstream)
    scraper = (
        QueueScraper(lambda: source.topology().endpoints(), picker.queued, queue_scrape_interval, upstream=upstream)
        if queue_scrape_interval > 0 and picker.policy == "LeastLoad"
        else None
    )
    state = RouterState(source, picker, metrics, proxy, scraper, hold)
    # The body limit is the proxy's (a JSON 413); aiohttp's own must not answer first.
    app = web.Application(client_max_size=max_body_bytes + 1)
    app[STATE] = state

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await source.start()
        await proxy.start()
        if scraper is not None:
            await scraper.start()
        keys = asyncio.create_task(keep_keys_fresh(verifier, keys_refresh_s, report_keys)) if verifier else None
        yield
        if keys is not None:
            keys.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keys
            await verifier.close()  # type: ignore[union-attr]
        if scraper is not None:
            await scraper.stop()
        await proxy.stop()
        await source.stop()

    app.cleanup_ctx.append(lifecycle)

    async def v1(request: web.Request) -> web.StreamResponse:
        # Served while draining too: until the listener closes, a request here is one the Service still
        # sent (its endpoints lag /ready), and a 503 would fail it for nothing.
        return await proxy.handle(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        if state.draining:
            return web.json_response({"status": "draining"}, status=503)
        topo = source.topology()
        if not topo.synced:
            return web.json_response({"status": "syncing"}, status=503)
        return web.json_response({"status": "ready", "endpoints": len(topo.endpoints())})

    async def metrics_view(_: web.Request) -> web.Response:
        metrics.endpoints.clear()
        for rev in source.topology().revisions():
            metrics.endpoints.labels(rev.name).set(len(rev.endpoints))
        auth = auth_status(verifier)
        if auth is not None:
            metrics.issuer_reachable.set(1 if auth["reachable"] else 0)
            metrics.issuer_keys.set(auth["keys"])
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)

    async def status_view(_: web.Request) -> web.Response:
        return web.json_response({"auth": auth_status(verifier)})

    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/status", status_view)
    app.router.add_route("*", "/v1/{tail:.*}", v1)
    return app
