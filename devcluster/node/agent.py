"""The node agent: watches the pods bound to the node and runs a ``PodWorker`` for each, keeps the
Node's status (Ready, addresses, capacity) fresh, and forwards the apiserver (and add-ons' ports)
into the node's network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
import urllib.parse
from typing import Any

from devcluster.kube import Kube, KubeError
from devcluster.network import Network
from devcluster.node.config import NODE_API_PORT, NodeConfig
from devcluster.node.container import now
from devcluster.node.forward import forward
from devcluster.node.pod import PodWorker

log = logging.getLogger("procnode")
HEARTBEAT_SECONDS = 10.0


class Agent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.net = Network(cfg.slot)
        self.kube = Kube(cfg.kubeconfig_server, cfg.ca, cfg.cert, cfg.key, user_agent="autoglm-procnode")
        self.workers: dict[str, PodWorker] = {}
        self.gone: set[str] = set()
        self.loop: asyncio.AbstractEventLoop
        self.started = now()

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        return await asyncio.to_thread(self.kube.request, method, path, body, content_type)

    def force_deleted(self, uid: str) -> bool:
        return uid in self.gone

    def release(self, worker: PodWorker) -> None:
        self.workers.pop(worker.uid, None)

    def _index(self) -> int:
        used = {w.index for w in self.workers.values()}
        return next(i for i in range(self.net.ranges.max_pods) if i not in used)

    def on_pod(self, ev_type: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        w = self.workers.get(uid)
        if ev_type == "DELETED":
            self.gone.add(uid)
            if w:
                w.pod["metadata"]["deletionGracePeriodSeconds"] = 0
                w.stopping.set()
            return
        if w is None:
            if pod["metadata"].get("deletionTimestamp") and not pod.get("status", {}).get("podIP"):
                # Never started here (or the agent restarted): nothing to stop, finish the deletion.
                self.loop.create_task(self._finish(pod))
                return
            w = PodWorker(self, pod, self._index())
            self.workers[uid] = w
            self.loop.create_task(w.run())
            log.info("Pod admitted pod=%s/%s ip_index=%d", w.ns, w.name, w.index)
            return
        if pod["metadata"].get("deletionTimestamp") and not w.stopping.is_set():
            w.pod["metadata"]["deletionGracePeriodSeconds"] = pod["metadata"].get("deletionGracePeriodSeconds", 30)
            w.stopping.set()

    async def _finish(self, pod: dict[str, Any]) -> None:
        m = pod["metadata"]
        with contextlib.suppress(KubeError):
            await self.call(
                "DELETE",
                f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                {
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": m["uid"]},
                },
            )

    def _watch_pods(self) -> None:
        """Blocking: list + watch the pods bound to this node, handing events to the loop."""
        path = f"/api/v1/pods?fieldSelector={urllib.parse.quote('spec.nodeName=' + self.cfg.node)}"
        while True:
            try:
                listing = self.kube.get(path)
                for pod in listing["items"]:
                    self.loop.call_soon_threadsafe(self.on_pod, "ADDED", pod)
                rv = listing["metadata"]["resourceVersion"]
                while True:
                    for ev in self.kube.watch(path, rv):
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            raise KubeError(obj.get("code", 500), obj.get("message", ""))
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] != "BOOKMARK":
                            self.loop.call_soon_threadsafe(self.on_pod, ev["type"], obj)
            except Exception as exc:  # noqa: BLE001 - relist after any watch failure
                log.info("Pod watch restarted error=%s", exc)
                time.sleep(0.5)

    def node_status(self) -> dict[str, Any]:
        t = now()
        cap = {
            "cpu": self.cfg.cpu,
            "memory": self.cfg.memory,
            "pods": str(self.net.ranges.max_pods),
            "ephemeral-storage": "100Gi",
        }
        conds = [
            {
                "type": k,
                "status": "False",
                "reason": f"KubeletHas{v}",
                "lastHeartbeatTime": t,
                "lastTransitionTime": self.started,
            }
            for k, v in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        conds.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "lastHeartbeatTime": t,
                "lastTransitionTime": self.started,
                "message": "process node agent is posting ready status",
            }
        )
        return {
            "capacity": cap,
            "allocatable": cap,
            "conditions": conds,
            "addresses": [
                {"type": "InternalIP", "address": self.net.ranges.node_ip},
                {"type": "Hostname", "address": self.cfg.node},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.36.3-procnode",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "procnode://1",
                "osImage": "autoglm process node",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def heartbeat(self) -> None:
        while True:
            try:
                await self.call(
                    "PATCH",
                    f"/api/v1/nodes/{self.cfg.node}/status",
                    {"status": self.node_status()},
                    "application/strategic-merge-patch+json",
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("Node heartbeat failed error=%s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def forwards(self) -> list[asyncio.AbstractServer]:
        """The apiserver on the node namespace's loopback (kube-proxy, add-ons) and on the node's
        address (the `kubernetes` Service's endpoint, for pods); add-ons' ports on loopback."""
        servers = []
        if self.cfg.api_port:
            for host in ("127.0.0.1", self.net.ranges.node_ip):
                servers.append(await forward(self.net.node_ns, NODE_API_PORT, self.cfg.api_port, host=host))
        for port, target, *where in self.cfg.forwards:
            host = self.net.ranges.node_ip if where == ["node"] else "127.0.0.1"
            servers.append(await forward(self.net.node_ns, port, target, host=host))
        return servers

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(s, stop.set)
        servers = await self.forwards()
        hb = asyncio.create_task(self.heartbeat())
        threading.Thread(target=self._watch_pods, daemon=True, name="pod-watch").start()
        await stop.wait()
        hb.cancel()
        for srv in servers:
            srv.close()
        # The node goes away: stop every container quickly (the cluster is stopping too).
        for w in list(self.workers.values()):
            w.pod["metadata"]["deletionGracePeriodSeconds"] = 2
            w.stopping.set()
        for w in list(self.workers.values()):
            await w.stop_all(2)
