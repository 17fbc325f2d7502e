"""A pod's life on the node: image check, volumes, network, init containers in order, then the
containers, each restarted per ``restartPolicy`` with the kubelet's back-off (10 s doubling, 5 min
cap, reset after 10 min of running), and the pod's phase."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from devcluster.node.config import BACKOFF_MAX, ConfigError

if TYPE_CHECKING:
    from devcluster.node.container import Container
    from devcluster.node.pod import PodWorker

BACKOFF_RESET_SECONDS = 600.0


def backoff_delay(n: int, base: float, cap: float = BACKOFF_MAX) -> float:
    """The delay before the ``n``-th restart (0-based) since the last reset."""
    return min(base * 2**n, cap)


class Lifecycle:
    def __init__(self, worker: PodWorker) -> None:
        self.w = worker

    async def run(self) -> None:
        w = self.w
        for c in w.init_containers + w.containers:
            if w.agent.cfg.image(c.spec.get("image", "")) is None:
                c.state = {
                    "waiting": {
                        "reason": "ErrImagePull",
                        "message": (
                            f'image "{c.spec.get("image")}" is not in the process node\'s image table '
                            f"(devcluster/images.py): nothing to run it with"
                        ),
                    }
                }
                w.mark()
                await w.stopping.wait()
                return
        while not w.stopping.is_set():
            try:
                await w.volumes.prepare()
                break
            except ConfigError as exc:
                for c in w.containers:
                    c.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                w.mark()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(w.stopping.wait(), 2)
        if w.stopping.is_set():
            return
        w.tasks.append(asyncio.create_task(w.volumes.keep_tokens_fresh()))
        w.netns, w.pod_ip = await asyncio.to_thread(w.agent.net.add_pod, w.index)
        w.phase = "Pending"
        w.mark()
        for c in w.init_containers:
            c.state = {"waiting": {"reason": "PodInitializing"}}
            for _ in range(1000):
                code = await w.launcher.run_once(c)
                if code == 0 or w.stopping.is_set():
                    break
                if w.pod["spec"].get("restartPolicy", "Always") == "Never":
                    w.phase = "Failed"
                    w.mark()
                    await w.stopping.wait()
                    return
                await self.backoff(c)
            if w.stopping.is_set():
                return
            c.done = True
        loops = [asyncio.create_task(self.container_loop(c)) for c in w.containers]
        w.tasks.extend(loops)
        await asyncio.gather(*loops, return_exceptions=True)
        if not w.stopping.is_set():
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in w.containers]
            w.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            w.mark()
            await w.stopping.wait()

    async def container_loop(self, c: Container) -> None:
        policy = self.w.pod["spec"].get("restartPolicy", "Always")
        while not self.w.stopping.is_set():
            code = await self.w.launcher.run_once(c)
            if self.w.stopping.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                c.done = True
                return
            await self.backoff(c)

    async def backoff(self, c: Container) -> None:
        w = self.w
        if time.monotonic() - (c.started_at or time.monotonic()) > BACKOFF_RESET_SECONDS:
            c.backoff_n = 0
        delay = backoff_delay(c.backoff_n, w.agent.cfg.backoff_base)
        c.backoff_n += 1
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": (f"back-off {delay:.0f}s restarting failed container={c.name} pod={w.name}_{w.ns}({w.uid})"),
            }
        }
        c.ready = False
        w.mark()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(w.stopping.wait(), delay)
        if not w.stopping.is_set():
            c.restart_count += 1
