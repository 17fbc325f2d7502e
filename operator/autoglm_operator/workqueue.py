"""``Reconciler``: runs ``reconcile`` per resource: serialised, coalesced, bounded, retried with backoff.

Two background loops: the resync (every ``resync_seconds``, every known resource: served from the
cache, it reads and writes nothing when nothing changed) and one shared poll of the Secrets/PVCs
that resources wait for (every ``precondition_poll_seconds``: one GET per distinct object, not per
resource, and a reconcile only for the resources whose object changed). Watching Secrets instead
would mean holding every Secret of every namespace in memory (they carry no label of ours); the
poll costs nothing while nothing waits. A reconcile that lost a race (409) is retried reading
from the API (``api``), not the cache, which may not have caught up yet.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import metrics
from .kube import ApiError, KubeAPI
from .reconcile import reconcile
from .settings import OperatorSettings

log = logging.getLogger("autoglm_operator.reconcile")


class Reconciler:
    """Runs ``reconcile`` per resource: serialised, coalesced, bounded, retried with backoff."""

    def __init__(
        self, kube: KubeAPI, settings: OperatorSettings, logger: logging.Logger = log, api: KubeAPI | None = None
    ) -> None:
        self.kube = kube
        self.api = api or kube  # uncached: for the retry after a conflict and the precondition poll
        self._stale: set[tuple[str, str]] = set()  # retry these from the API (lost a race: 409)
        # resource → the Secrets/PVCs it waits for: (kind, name, resourceVersion seen or "")
        self.waiting: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        self.settings = settings
        self.log = logger
        self.known: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str], int] = {}
        self._retry_handles: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(settings.max_concurrent_reconciles)
        self.runs = 0
        self.last_durations: list[float] = []

    def seen(self, namespace: str, name: str) -> None:
        self.known.add((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.known.discard(key)
        self.waiting.pop(key, None)
        self._stale.discard(key)
        self._failures.pop(key, None)
        handle = self._retry_handles.pop(key, None)
        if handle:
            handle.cancel()

    def observe_event(self, namespace: str, name: str, *, deleted: bool = False) -> None:
        """An AutoGLMDeployment event: remember it (for the resync) and reconcile it."""
        if deleted:
            self.forget(namespace, name)
            return
        self.seen(namespace, name)
        self.trigger(namespace, name)

    def trigger(self, namespace: str, name: str) -> None:
        """Ask for a reconcile; many triggers while one is queued make one run."""
        key = (namespace, name)
        if key in self._pending:
            return
        self._pending.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key), name=f"reconcile {namespace}/{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def trigger_all(self) -> None:
        for ns, name in sorted(self.known):
            self.trigger(ns, name)

    async def _run(self, key: tuple[str, str]) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock, self._sem:
                self._pending.discard(key)
                started = time.monotonic()
                kube = self.api if key in self._stale else self.kube
                try:
                    outcome = await reconcile(kube, self.settings, *key, logger=self.log)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried with backoff, never fatal
                    metrics.observe_reconcile(time.monotonic() - started, exc)
                    if isinstance(exc, ApiError) and exc.status == 409:
                        self._stale.add(key)
                    self._schedule_retry(key, exc)
                    return
                finally:
                    self.runs += 1
                    self.last_durations = (self.last_durations + [time.monotonic() - started])[-200:]
                metrics.observe_reconcile(time.monotonic() - started)
                self._failures.pop(key, None)
                self._stale.discard(key)
                if outcome.gone:
                    self.forget(*key)
                    return
                if outcome.waiting_for:
                    self.waiting[key] = list(outcome.waiting_for)
                else:
                    self.waiting.pop(key, None)
                if outcome.requeue_after:
                    self._schedule(key, outcome.requeue_after)
        finally:
            if key not in self._pending and not lock.locked():
                self._locks.pop(key, None)

    def _schedule_retry(self, key: tuple[str, str], exc: Exception) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(60.0, 0.5 * 2 ** (n - 1))
        level = logging.INFO if isinstance(exc, ApiError) and exc.status == 409 else logging.WARNING
        self.log.log(
            level,
            "Failed to reconcile %s/%s (attempt %d), retrying in %.1fs: %s",
            *key,
            n,
            delay,
            exc,
            exc_info=not isinstance(exc, ApiError),
        )
        self._schedule(key, delay)

    def _schedule(self, key: tuple[str, str], delay: float) -> None:
        old = self._retry_handles.pop(key, None)
        if old:
            old.cancel()
        self._retry_handles[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: tuple[str, str]) -> None:
        self._retry_handles.pop(key, None)
        if key in self.known:
            self.trigger(*key)

    async def resync_forever(self) -> None:
        """The one periodic safety net: re-reconcile every known resource (writes nothing if in sync)."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.trigger_all()

    async def poll_preconditions(self) -> int:
        """One round of the shared poll: reconcile the resources whose awaited Secret/PVC changed."""
        objects: dict[tuple[str, str, str], list[tuple[tuple[str, str], str]]] = {}
        for key, refs in list(self.waiting.items()):
            for kind, name, seen in refs:
                objects.setdefault((key[0], kind, name), []).append((key, seen))
        triggered = 0
        for (ns, kind, name), waiters in objects.items():
            try:
                obj = await self.api.get(kind, ns, name, fresh=True)
            except ApiError as exc:
                self.log.warning("Failed to poll %s %s/%s: %s", kind, ns, name, exc)
                continue
            now = (obj or {}).get("metadata", {}).get("resourceVersion", "")
            for key, seen in waiters:
                if now != seen and key in self.known:
                    triggered += 1
                    self.trigger(*key)
        return triggered

    async def poll_preconditions_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.precondition_poll_seconds)
            await self.poll_preconditions()

    async def close(self) -> None:
        for handle in self._retry_handles.values():
            handle.cancel()
        self._retry_handles.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
