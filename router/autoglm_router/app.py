"""The router's aiohttp application: ``/v1/*`` through the proxy, ``/healthz``, ``/ready``, ``/metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from autoglm_router.endpoints import EndpointSource
from autoglm_router.hold import HoldQueue
from autoglm_router.metrics import CONTENT_TYPE, RouterMetrics
from autoglm_router.picker import Picker
from autoglm_router.proxy import Authenticate, Proxy, allow_all
from autoglm_router.queues import QueueScraper


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
) -> web.Application:
    """The app; ``hold_timeout`` 0 (the default here; the CLI's is 120 s) answers a request that finds no
    Ready pod with a 503 at once instead of holding it."""
    metrics = RouterMetrics(deployment)
    hold = HoldQueue(hold_timeout, hold_capacity, lambda rev: metrics.held.labels(deployment, rev))
    source.subscribe(hold.notify)
    proxy = Proxy(source, picker, metrics, max_body_bytes, authenticate, hold=hold)
    scraper = (
        QueueScraper(lambda: source.topology().endpoints(), picker.queued, queue_scrape_interval)
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
        yield
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
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_route("*", "/v1/{tail:.*}", v1)
    return app
