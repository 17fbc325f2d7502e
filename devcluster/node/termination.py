"""Stopping containers and pods as the kubelet does: ``preStop`` (``sleep``, ``httpGet``, ``exec``),
SIGTERM, the grace period, SIGKILL; then the pod's network goes and its deletion is finished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from devcluster.kube import KubeError
from devcluster.node.probes import http_get, port_of

if TYPE_CHECKING:
    from devcluster.node.container import Container
    from devcluster.node.pod import PodWorker

log = logging.getLogger("procnode")


class Terminator:
    def __init__(self, worker: PodWorker) -> None:
        self.w = worker

    async def kill(self, c: Container, why: str) -> None:
        """Stop one container (a failed probe); its restart policy then applies."""
        log.info("Killing container pod=%s/%s container=%s reason=%r", self.w.ns, self.w.name, c.name, why)
        grace = self.w.pod["spec"].get("terminationGracePeriodSeconds", 30)
        await self.stop_container(c, float(grace), run_pre_stop=True)

    async def pre_stop(self, c: Container) -> None:
        hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
        try:
            if "sleep" in hook:
                await asyncio.sleep(float(hook["sleep"]["seconds"]))
            elif "httpGet" in hook:
                h = hook["httpGet"]
                await http_get(
                    h.get("host") or self.w.pod_ip,
                    port_of(c, h["port"]),
                    h.get("path", "/"),
                    30,
                    h.get("scheme", "HTTP"),
                )
            elif "exec" in hook:
                await self.w.prober.exec_in(c, hook["exec"]["command"], 30)
        except (TimeoutError, OSError, ValueError) as exc:
            log.info("PreStop hook failed pod=%s/%s container=%s error=%s", self.w.ns, self.w.name, c.name, exc)

    async def stop_container(self, c: Container, grace: float, run_pre_stop: bool) -> None:
        proc = c.proc
        if proc is None or proc.returncode is not None:
            return
        deadline = time.monotonic() + grace
        if run_pre_stop:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.pre_stop(c), max(grace, 0.1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), max(deadline - time.monotonic(), 2.0))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def terminate(self) -> None:
        """The pod is being deleted: stop its containers within the grace period, clean up, finish."""
        w = self.w
        grace = float(
            w.pod["metadata"].get("deletionGracePeriodSeconds", w.pod["spec"].get("terminationGracePeriodSeconds", 30))
        )
        await asyncio.gather(*(self.stop_container(c, grace, run_pre_stop=True) for c in w.containers))
        for c in w.init_containers:
            await self.stop_container(c, 0, run_pre_stop=False)
        for t in w.tasks:
            t.cancel()
        await asyncio.to_thread(w.agent.net.remove_pod, w.index)
        w.agent.release(w)
        if not w.agent.force_deleted(w.uid):
            with contextlib.suppress(KubeError):
                await w.agent.call(
                    "DELETE",
                    f"/api/v1/namespaces/{w.ns}/pods/{w.name}",
                    {
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": w.uid},
                    },
                )
        log.info("Pod removed pod=%s/%s", w.ns, w.name)
