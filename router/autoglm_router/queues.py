"""LeastLoad's second input: each pod's queue depth, scraped from its ``/metrics`` once a second.

The runtime reports ``autoglm_requests_waiting`` (requests waiting to be scheduled); the router's own
in-flight counts see only its own requests, the queue depth sees every router's (and direct clients').
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from autoglm_router.endpoints import Endpoint
from autoglm_router.tls import PLAIN, Upstream

log = logging.getLogger("autoglm_router.queues")

WAITING_METRIC = "autoglm_requests_waiting"


def waiting_from_metrics(text: str) -> int:
    """The sum of ``autoglm_requests_waiting`` samples in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == WAITING_METRIC:
            total += sum(s.value for s in family.samples if s.name == WAITING_METRIC)
    return int(total)


class QueueScraper:
    def __init__(
        self,
        endpoints: Callable[[], list[Endpoint]],
        into: dict[str, int],
        interval: float = 1.0,
        timeout: float = 0.5,
        upstream: Upstream = PLAIN,
    ) -> None:
        self.endpoints = endpoints
        self.upstream = upstream
        self.into = into
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    async def _one(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        try:
            async with session.get(self.upstream.url(ep) + "/metrics", **self.upstream.request_kwargs()) as resp:
                if resp.status == 200:
                    self.into[ep.address] = waiting_from_metrics(await resp.text())
                    return
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("Failed to scrape queue depth, pod=%s error=%s", ep.pod, exc)
        self.into.pop(ep.address, None)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            while True:
                eps = self.endpoints()
                await asyncio.gather(*(self._one(session, ep) for ep in eps))
                for gone in set(self.into) - {ep.address for ep in eps}:
                    self.into.pop(gone, None)
                await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
