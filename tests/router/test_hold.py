"""The hold queue (unit tier, no pods): requests wait while nothing is Ready, wake on the source's change
event (not a poll), are bounded in number and time, and are counted in the gauge by revision."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge

from autoglm_router.hold import HoldQueue, HoldRefused, HoldTimedOut


def _gauge() -> Gauge:
    return Gauge("held", "held", ["revision"], registry=CollectorRegistry())


def _value(g: Gauge, revision: str) -> float:
    return g.labels(revision)._value.get()


async def test_ready_at_once_does_not_hold():
    q = HoldQueue(timeout=10, capacity=1)
    assert await q.wait("r1", lambda: True) == 0.0 and q.held == 0


async def test_held_until_notified_then_released_together():
    g = _gauge()
    q = HoldQueue(timeout=30, capacity=10, gauge=g.labels)
    ready = False
    waiters = [asyncio.create_task(q.wait("r1", lambda: ready)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert q.held == 5 and _value(g, "r1") == 5 and not any(w.done() for w in waiters)
    q.notify()  # a change that does not make anything Ready: they all stay
    await asyncio.sleep(0.05)
    assert q.held == 5 and not any(w.done() for w in waiters)
    ready = True
    q.notify()
    waited = await asyncio.wait_for(asyncio.gather(*waiters), 1)  # released by the event, well before 30 s
    assert all(0 < w < 1 for w in waited)
    assert q.held == 0 and _value(g, "r1") == 0


async def test_ready_without_notify_stays_held():
    """Release is event-driven: the queue does not poll ``ready``; without a notify nothing moves."""
    q = HoldQueue(timeout=0.3, capacity=1)
    ready = False
    task = asyncio.create_task(q.wait("r1", lambda: ready))
    await asyncio.sleep(0.05)
    ready = True
    with pytest.raises(HoldTimedOut):
        await task


async def test_full_is_refused_and_timeout_raises_and_frees_the_slot():
    g = _gauge()
    q = HoldQueue(timeout=0.2, capacity=2, gauge=g.labels)
    held = [asyncio.create_task(q.wait("r1", lambda: False)) for _ in range(2)]
    await asyncio.sleep(0.02)
    with pytest.raises(HoldRefused) as exc:
        await q.wait("r1", lambda: False)
    assert exc.value.reason == "full"
    for task in held:
        with pytest.raises(HoldTimedOut):
            await task
    assert q.held == 0 and _value(g, "r1") == 0
    task = asyncio.create_task(q.wait("r1", lambda: False))  # room again
    await asyncio.sleep(0.02)
    assert q.held == 1
    task.cancel()  # a client that went away leaves the count too
    await asyncio.gather(task, return_exceptions=True)
    assert q.held == 0 and _value(g, "r1") == 0


async def test_off_refuses_at_once():
    with pytest.raises(HoldRefused) as exc:
        await HoldQueue(timeout=0, capacity=10).wait("r1", lambda: False)
    assert exc.value.reason == "off"
    with pytest.raises(ValueError):
        HoldQueue(timeout=-1, capacity=1)
