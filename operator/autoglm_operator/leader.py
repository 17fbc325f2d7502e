"""Leader election with a ``coordination.k8s.io/v1`` Lease: one active operator, the others standby.

Why a Lease we hold ourselves and not kopf's peering: with kopf peering *every* replica PATCHes the
peering object (each announces itself, every ``lifetime - 10`` s, 50 s by default) and a standby only
notices a dead peer once ``lifetime`` (60 s) has passed, so failover ≤ 20 s would cost two writers
every few seconds, plus two CRDs in the chart, and a frozen standby has stopped its watches (a cold
cache at failover). With a Lease only the leader writes: one PUT every ``RENEW_SECONDS`` (5 s: 24
writes in 2 idle minutes, all to the one Lease, which the zero-idle-writes counts exclude by name),
the standby only reads it (one GET every ``RETRY_SECONDS``), keeps its kopf watches running and
takes over with everything already seen.

Failover: a standby takes the Lease when the record it last saw has not changed for
``LEASE_SECONDS`` (15 s, measured on its own clock, as client-go does, so clock skew does not
matter), i.e. 15–17 s after the leader's last renewal; then it reconciles every known resource.
A leader that stops cleanly releases the Lease (the standby takes it within ``RETRY_SECONDS``). A
leader that cannot renew for ``LEASE_SECONDS - RENEW_SECONDS`` stops acting and exits (the Pod
restarts it as a standby).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from .conditions import format_micro_time
from .kube import ApiError, Kube

log = logging.getLogger(__name__)

LEASE_SECONDS = 15
RENEW_SECONDS = 5.0
RETRY_SECONDS = 2.0


def identity() -> str:
    """Unique per process: the Pod's name in a cluster, plus the pid (two local processes)."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{os.getpid()}"


def _now() -> str:
    return format_micro_time(dt.datetime.now(dt.UTC))


class LeaderElector:
    """Acquire, renew and release one Lease; ``leading`` says whether this process may act."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        *,
        on_started_leading: Callable[[], None],
        on_stopped_leading: Callable[[], None],
        lease_seconds: int = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] | None = None,
        identity_: str | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity_ or identity()
        self.leading = False
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock or asyncio.get_running_loop().time
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, resourceVersion) last seen
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._lease: dict[str, Any] | None = None  # as the last write returned it

    async def run(self) -> None:
        while True:
            try:
                if self.leading:
                    await self._renew()
                else:
                    await self._try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API may be briefly unreachable: try again
                log.warning("Failed to reach Lease %s/%s: %s", self.namespace, self.name, exc)
                if self.leading and self._clock() - self._renewed_at > self.lease_seconds - self.renew_seconds:
                    self._lose("it could not be renewed in time")
            await asyncio.sleep(self.renew_seconds if self.leading else self.retry_seconds)

    def _spec(self, old: dict[str, Any] | None) -> dict[str, Any]:
        now = _now()
        spec = dict((old or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if old else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self.lease_seconds, renewTime=now)
        return spec

    async def _try_acquire(self) -> None:
        lease = await self.kube.get("Lease", self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None),
            }
            self._lease = await self.kube.create("Lease", self.namespace, body)
            if self._lease is not None:
                self._start()
            return
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), lease["metadata"]["resourceVersion"])
        now = self._clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.get("holderIdentity")
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and now - self._observed_at < duration:
            return  # held, and renewed recently enough
        lease["spec"] = self._spec(lease)
        try:
            self._lease = await self.kube.replace("Lease", self.namespace, self.name, lease)  # optimistic
        except ApiError as exc:
            if exc.status == 409:
                return  # another standby won the race
            raise
        if holder and holder != self.identity:
            log.info(
                "Took over Lease %s/%s from %s (not renewed for %.0f s).",
                self.namespace,
                self.name,
                holder,
                now - self._observed_at,
            )
        self._start()

    async def _renew(self) -> None:
        """One PUT from the copy the last write returned (its resourceVersion guards the race)."""
        lease = self._lease
        if lease is None:
            lease = await self.kube.get("Lease", self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            self._lose("another process holds it")
            return
        lease = {**lease, "spec": self._spec(lease)}
        try:
            self._lease = await self.kube.replace("Lease", self.namespace, self.name, lease)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self._lease = None  # read it again: still ours (a lost reply) or taken
            return
        self._renewed_at = self._clock()

    def _start(self) -> None:
        self.leading = True
        self._renewed_at = self._clock()
        log.info("Became the leader: Lease %s/%s held by %s.", self.namespace, self.name, self.identity)
        self._on_started()

    def _lose(self, why: str) -> None:
        self.leading = False
        log.error("Lost the leadership of Lease %s/%s: %s.", self.namespace, self.name, why)
        self._on_stopped()

    async def release(self) -> None:
        """On a clean stop: hand the Lease over at once (the standby need not wait for it to expire)."""
        if not self.leading:
            return
        self.leading = False
        lease = self._lease or await self.kube.get("Lease", self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _now()}
        try:
            await self.kube.replace("Lease", self.namespace, self.name, lease)
            log.info("Released Lease %s/%s.", self.namespace, self.name)
        except ApiError as exc:
            log.warning("Failed to release Lease %s/%s: %s", self.namespace, self.name, exc)
