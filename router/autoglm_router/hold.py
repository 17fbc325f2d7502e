"""Holding requests while no model pod is Ready (scale to zero: the first request wakes the deployment).

A request that finds no Ready pod in any revision waits here instead of failing: at most ``capacity``
requests at once, each at most ``timeout`` seconds. The endpoint source calls ``notify`` on every change
of its view (an EndpointSlice event), and every held request looks again at once: no polling. A request
that cannot wait (the queue is full, holding is off) or waited too long gets the router's 503 with
``Retry-After``. How many requests wait, by revision, is a gauge that KEDA's trigger reads (the first
held request is what scales a deployment up from zero).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import Gauge


class HoldRefused(Exception):
    """The request cannot be held: ``reason`` is ``full`` (capacity reached) or ``off`` (timeout 0)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HoldTimedOut(Exception):
    """No pod turned Ready within the hold timeout."""


class HoldQueue:
    def __init__(self, timeout: float, capacity: int, gauge: Callable[[str], Gauge] | None = None) -> None:
        if timeout < 0 or capacity < 0:
            raise ValueError("hold timeout and capacity must be >= 0")
        self.timeout = timeout
        self.capacity = capacity
        self.gauge = gauge  # revision → the gauge's child for it
        self.held = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """The endpoints changed: wake every held request to look again."""
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()

    async def wait(self, revision: str, ready: Callable[[], bool]) -> float:
        """Return once ``ready()`` is true (at once when it already is), with the seconds waited; raise
        ``HoldRefused`` or ``HoldTimedOut`` when the request must be answered with a 503 instead."""
        if ready():
            return 0.0
        if self.timeout == 0 or self.capacity == 0:
            raise HoldRefused("off")
        if self.held >= self.capacity:
            raise HoldRefused("full")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.timeout
        self._count(revision, +1)
        try:
            while not ready():
                changed = self._changed
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise HoldTimedOut()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    raise HoldTimedOut() from None
            return loop.time() - started
        finally:
            self._count(revision, -1)

    def _count(self, revision: str, delta: int) -> None:
        self.held += delta
        if self.gauge is not None:
            self.gauge(revision).inc(delta)
