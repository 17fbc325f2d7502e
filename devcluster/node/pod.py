"""One pod on the process node: its state and status, and the parts that run it (env, volumes,
launcher, probes, lifecycle, termination), each a class of its own module."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.kube import KubeError
from devcluster.node.container import Container, Launcher, now
from devcluster.node.env import EnvResolver
from devcluster.node.lifecycle import Lifecycle
from devcluster.node.probes import Prober
from devcluster.node.termination import Terminator
from devcluster.node.volumes import Volumes

if TYPE_CHECKING:
    from devcluster.node.agent import Agent

log = logging.getLogger("procnode")


class PodWorker:
    """Runs one pod until it is deleted, and keeps its status in the apiserver."""

    def __init__(self, agent: Agent, pod: dict[str, Any], index: int) -> None:
        self.agent, self.pod, self.index = agent, pod, index
        meta = pod["metadata"]
        self.uid, self.name, self.ns = meta["uid"], meta["name"], meta["namespace"]
        spec = pod["spec"]
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self.dir = Path(agent.cfg.state_dir) / "pods" / self.uid
        self.log_dir = Path(agent.cfg.state_dir) / "logs" / f"{self.ns}_{self.name}_{self.uid}"
        self.pod_ip = ""
        self.netns = ""
        self.phase = "Pending"
        self.start_time = now()
        self.conditions: dict[str, dict[str, Any]] = {}
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.last_patch: Any = None
        self.tasks: list[asyncio.Task] = []
        self.resolver = EnvResolver(self)
        self.volumes = Volumes(self, self.resolver)
        self.terminator = Terminator(self)
        self.prober = Prober(self, self.terminator.kill)
        self.launcher = Launcher(self)
        self.lifecycle = Lifecycle(self)

    # ----- status ----------------------------------------------------------------------------
    def _condition(self, type_: str, ok: bool, reason: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        old = self.conditions.get(type_)
        cond = {
            "type": type_,
            "status": status,
            "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now(),
        }
        # null deletes a reason left from before (the status is a strategic merge patch: see flush)
        cond["reason"] = reason if reason and not ok else None
        self.conditions[type_] = cond
        return cond

    def status(self) -> dict[str, Any]:
        init_ok = all(c.done for c in self.init_containers)
        ready = init_ok and bool(self.containers) and all(c.ready for c in self.containers)
        not_ready = "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
        conds = [
            self._condition("PodReadyToStartContainers", bool(self.pod_ip)),
            self._condition("Initialized", init_ok, "PodInitializing"),
            self._condition("Ready", ready, not_ready),
            self._condition("ContainersReady", ready, not_ready),
            self._condition("PodScheduled", True),
        ]
        node_ip = self.agent.net.ranges.node_ip
        st: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conds,
            "startTime": self.start_time,
            "hostIP": node_ip,
            "hostIPs": [{"ip": node_ip}],
            "containerStatuses": [c.status(self.uid) for c in self.containers],
        }
        if self.init_containers:
            st["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
        if self.pod_ip:
            st["podIP"], st["podIPs"] = self.pod_ip, [{"ip": self.pod_ip}]
        return st

    def mark(self) -> None:
        """Something in the status changed: patch it (soon, once)."""
        self.changed.set()

    async def status_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            await self.flush()

    async def flush(self) -> None:
        st = self.status()
        comparable = json.dumps(
            {**st, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in st["conditions"]]},
            sort_keys=True,
        )
        if comparable == self.last_patch:
            return
        try:
            await self.agent.call(
                "PATCH",
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                {"metadata": {"uid": self.uid}, "status": st},
                # Strategic merge, as the kubelet's: conditions merge by type, so those another component
                # wrote (a readiness gate's; the router's autoglm.io/OAuth2Keys) stay.
                "application/strategic-merge-patch+json",
            )
            self.last_patch = comparable
        except KubeError as exc:
            if exc.status in (404, 409):
                return
            log.warning("Patching pod status failed pod=%s/%s error=%s", self.ns, self.name, exc)
            self.agent.loop.call_later(1.0, self.mark)

    # ----- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Run the pod until it is deleted, then stop it."""
        self.tasks.append(asyncio.create_task(self.status_loop()))
        self.tasks.append(asyncio.create_task(self._run_logged()))
        await self.stopping.wait()
        await self.terminator.terminate()

    async def _run_logged(self) -> None:
        try:
            await self.lifecycle.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not take the node down
            log.exception("Pod worker failed pod=%s/%s", self.ns, self.name)

    async def stop_all(self, grace: float) -> None:
        """The node goes away: stop every container quickly, no hooks."""
        await asyncio.gather(
            *(
                self.terminator.stop_container(c, grace, run_pre_stop=False)
                for c in self.containers + self.init_containers
            )
        )
