"""The process node's agent: does for pods bound to ``proc-0`` what a kubelet does, with processes.

``python -m tests.cluster.procnode CONFIG.json`` (started by the harness). For each pod bound to the
node it:

- maps each container's image to local folders through the image table (an unknown image →
  ``Waiting/ErrImagePull``); resolves env (``value``, Secret/ConfigMap keys, ``fieldRef``, ``envFrom``)
  and volumes (hostPath through the node's host-path map, emptyDir, Secret/ConfigMap files); a
  missing Secret/ConfigMap → ``CreateContainerConfigError``, retried;
- gives the pod a network namespace and an IP from the node's ``podCIDR`` (``network.py``);
- runs init containers, then containers, each through ``launch.py`` (mount namespace, chroot,
  ``runAsUser``/``runAsGroup``); logs go to ``<state>/logs/<ns>_<pod>_<uid>/<container>/<restart>.log``;
- runs startup, readiness and liveness probes (``httpGet``, ``tcpSocket``, ``exec``) with their
  periods and thresholds; restarts per ``restartPolicy`` with the kubelet's back-off (10 s doubling,
  5 min cap); patches ``status`` (phase, conditions, IPs, ``containerStatuses`` with last termination
  and ``FallbackToLogsOnError`` messages) only when it changed;
- on deletion: ``preStop`` (``sleep``, ``httpGet``, ``exec``), SIGTERM, waits the grace period,
  SIGKILL, removes the network namespace and finishes the deletion.

It also keeps the Node's status (Ready, addresses, capacity) fresh. Only the standard library is
used, so the harness runs without the project's virtual environment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.cluster.network import Network

log = logging.getLogger("procnode")
BACKOFF_BASE, BACKOFF_MAX = 10.0, 300.0
HEARTBEAT_SECONDS = 10.0
LOG_TAIL_LINES = 80


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Kube:
    """A tiny blocking client for the apiserver (client-cert auth)."""

    def __init__(self, server: str, ca: str, cert: str, key: str) -> None:
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json",
                                              "User-Agent": "autoglm-procnode"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise KubeError(exc.code, exc.read().decode(errors="replace")[:500]) from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def watch(self, path: str, resource_version: str):
        sep = "&" if "?" in path else "?"
        url = f"{self.server}{path}{sep}watch=1&allowWatchBookmarks=true&timeoutSeconds=240&resourceVersion={resource_version}"
        req = urllib.request.Request(url, headers={"User-Agent": "autoglm-procnode"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=300) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)


# ==================================================================== config


@dataclass
class NodeConfig:
    kubeconfig_server: str
    ca: str
    cert: str
    key: str
    node: str
    slot: int
    state_dir: str
    images: list[dict[str, Any]]            # [{"match": "ghcr.io/autoglm/runtime", "binds": [...], "env": {...}}]
    host_paths: dict[str, str] = field(default_factory=dict)   # hostPath prefix -> folder on this machine
    api_port: int = 0                       # forwarded into the node namespace's 127.0.0.1:6443 (kube-proxy)
    forwards: list[list[int]] = field(default_factory=list)   # [[node-ns 127.0.0.1 port, root 127.0.0.1 port]]
    cpu: str = "16"
    memory: str = "64Gi"
    backoff_base: float = BACKOFF_BASE

    @classmethod
    def load(cls, path: str) -> "NodeConfig":
        return cls(**json.loads(Path(path).read_text()))

    def image(self, ref: str) -> dict[str, Any] | None:
        repo = ref.split("@")[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        return next((i for i in self.images if i["match"] == repo), None)

    def host_path(self, path: str) -> str:
        for prefix, target in sorted(self.host_paths.items(), key=lambda kv: -len(kv[0])):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return target + path[len(prefix.rstrip("/")):]
        return path


class ConfigError(Exception):
    """A pod's config cannot be resolved yet (missing Secret key...): reason + message for the status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ==================================================================== probes and hooks


def _insecure_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as the kubelet: HTTPS probes do not verify the certificate
    return ctx


async def http_get(host: str, port: int, path: str, timeout: float, scheme: str = "HTTP") -> int:
    """Status code of GET http(s)://host:port/path (raises on connection errors and timeouts)."""
    async def go() -> int:
        tls = _insecure_tls() if scheme.upper() == "HTTPS" else None
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.36\r\n"
                         f"Connection: close\r\n\r\n".encode())
            await writer.drain()
            line = await reader.readline()
            return int(line.split()[1])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)


# ==================================================================== containers


@dataclass
class Container:
    spec: dict[str, Any]
    init: bool = False
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    proc: asyncio.subprocess.Process | None = None
    done: bool = False              # init container finished successfully / terminated for good

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, pod_uid: str) -> dict[str, Any]:
        st = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "", "ready": self.ready,
              "restartCount": self.restart_count, "state": self.state, "lastState": self.last_state,
              "started": self.started}
        if self.proc is not None:
            st["containerID"] = f"proc://{pod_uid}/{self.name}/{self.restart_count}"
        return st


class PodWorker:
    """Runs one pod until it is deleted."""

    def __init__(self, agent: "Agent", pod: dict[str, Any], index: int) -> None:
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
        self.volumes: dict[str, str] = {}
        self.env_cache: dict[str, dict[str, str]] = {}
        self.tasks: list[asyncio.Task] = []

    # ----- status ----------------------------------------------------------------------------
    def _condition(self, type_: str, ok: bool, reason: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        old = self.conditions.get(type_)
        cond = {"type": type_, "status": status,
                "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now()}
        if reason and not ok:
            cond["reason"] = reason
        self.conditions[type_] = cond
        return cond

    def status(self) -> dict[str, Any]:
        init_ok = all(c.done for c in self.init_containers)
        ready = init_ok and bool(self.containers) and all(c.ready for c in self.containers)
        not_ready = "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
        conds = [self._condition("PodReadyToStartContainers", bool(self.pod_ip)),
                 self._condition("Initialized", init_ok, "PodInitializing"),
                 self._condition("Ready", ready, not_ready),
                 self._condition("ContainersReady", ready, not_ready),
                 self._condition("PodScheduled", True)]
        st: dict[str, Any] = {"phase": self.phase, "conditions": conds, "startTime": self.start_time,
                              "hostIP": self.agent.net.ranges.node_ip,
                              "hostIPs": [{"ip": self.agent.net.ranges.node_ip}],
                              "containerStatuses": [c.status(self.uid) for c in self.containers]}
        if self.init_containers:
            st["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
        if self.pod_ip:
            st["podIP"], st["podIPs"] = self.pod_ip, [{"ip": self.pod_ip}]
        return st

    def mark(self) -> None:
        self.changed.set()

    async def status_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            await self.flush()

    async def flush(self) -> None:
        st = self.status()
        comparable = json.dumps({**st, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                                      for c in st["conditions"]]}, sort_keys=True)
        if comparable == self.last_patch:
            return
        try:
            await self.agent.call("PATCH", f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                                  {"metadata": {"uid": self.uid}, "status": st}, "application/merge-patch+json")
            self.last_patch = comparable
        except KubeError as exc:
            if exc.status in (404, 409):
                return
            log.warning("Patching pod status failed pod=%s/%s error=%s", self.ns, self.name, exc)
            self.agent.loop.call_later(1.0, self.mark)

    # ----- resolution ------------------------------------------------------------------------
    async def _object(self, kind: str, name: str, optional: bool = False) -> dict[str, Any] | None:
        plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
        try:
            obj = await self.agent.call("GET", f"/api/v1/namespaces/{self.ns}/{plural}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise ConfigError("CreateContainerConfigError", f'{kind.lower()} "{name}" not found') from None
            raise
        data = dict(obj.get("data") or {})
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return data

    async def _key(self, kind: str, ref: dict[str, Any]) -> str | None:
        data = await self._object(kind, ref["name"], ref.get("optional", False))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError("CreateContainerConfigError",
                              f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")
        return data[ref["key"]]

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                  "spec.nodeName": self.agent.cfg.node, "spec.serviceAccountName": self.pod["spec"].get(
                      "serviceAccountName", ""), "status.podIP": self.pod_ip, "status.hostIP": self.agent.net.ranges.node_ip}
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef {path}")

    async def env(self, c: Container, image: dict[str, Any]) -> dict[str, str]:
        ks = self.agent.net.ranges
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **image.get("env", {}),
               "HOSTNAME": self.name, "KUBERNETES_SERVICE_HOST": ks.kubernetes_service_ip,
               "KUBERNETES_SERVICE_PORT": "443"}
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src:
                    data = await self._object(kind, src[key]["name"], src[key].get("optional", False)) or {}
                    env.update({prefix + k: v for k, v in data.items()})
        for e in c.spec.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                value = await self._key("Secret", vf["secretKeyRef"])
            elif "configMapKeyRef" in vf:
                value = await self._key("ConfigMap", vf["configMapKeyRef"])
            elif "fieldRef" in vf:
                value = self._field(vf["fieldRef"]["fieldPath"])
            else:
                raise ConfigError("CreateContainerConfigError", f"unsupported valueFrom for env {e['name']}")
            if value is not None:
                env[e["name"]] = value
        return env

    async def prepare_volumes(self) -> None:
        vol_dir = self.dir / "volumes"
        for v in self.pod["spec"].get("volumes") or []:
            name, target = v["name"], vol_dir / v["name"]
            if "hostPath" in v:
                path = self.agent.cfg.host_path(v["hostPath"]["path"])
                kind = v["hostPath"].get("type", "")
                if kind == "Directory" and not os.path.isdir(path):
                    raise ConfigError("ContainerCreating", f"hostPath {v['hostPath']['path']} is not a directory on the node")
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                self.volumes[name] = path
            elif "emptyDir" in v:
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o777)
                self.volumes[name] = str(target)
            elif "secret" in v or "configMap" in v or "projected" in v:
                sources = (v["projected"].get("sources") or []) if "projected" in v else [v]
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o755)
                for s in sources:
                    for kind, key, name_key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                        if key not in s:
                            continue
                        ref = s[key]
                        data = await self._object(kind, ref.get(name_key) or ref.get("name"), ref.get("optional", False)) or {}
                        items = ref.get("items") or [{"key": k, "path": k} for k in data]
                        for it in items:
                            if it["key"] in data:
                                f = target / it["path"]
                                f.parent.mkdir(parents=True, exist_ok=True)
                                f.write_text(data[it["key"]])
                                os.chmod(f, 0o644)
                self.volumes[name] = str(target)
            else:
                raise ConfigError("ContainerCreating", f"volume {name}: only hostPath, emptyDir, secret, configMap and "
                                                       "projected volumes run on the process node")

    # ----- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Run the pod until it is deleted, then stop it."""
        self.tasks.append(asyncio.create_task(self.status_loop()))
        main = asyncio.create_task(self._run_logged())
        self.tasks.append(main)
        await self.stopping.wait()
        await self.terminate()

    async def _run_logged(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not take the node down
            log.exception("Pod worker failed pod=%s/%s", self.ns, self.name)

    async def _run(self) -> None:
        for c in self.init_containers + self.containers:
            if self.agent.cfg.image(c.spec.get("image", "")) is None:
                c.state = {"waiting": {"reason": "ErrImagePull", "message": (
                    f'image "{c.spec.get("image")}" is not in the process node\'s image table '
                    f"(tests/cluster/harness.py IMAGES): nothing to run it with")}}
                self.mark()
                await self.stopping.wait()
                return
        while not self.stopping.is_set():
            try:
                await self.prepare_volumes()
                break
            except ConfigError as exc:
                for c in self.containers:
                    c.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                self.mark()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 2)
        if self.stopping.is_set():
            return
        self.netns, self.pod_ip = await asyncio.to_thread(self.agent.net.add_pod, self.index)
        self.phase = "Pending"
        self.mark()
        for c in self.init_containers:
            c.state = {"waiting": {"reason": "PodInitializing"}}
            for _ in range(1000):
                code = await self.run_once(c)
                if code == 0 or self.stopping.is_set():
                    break
                if self.pod["spec"].get("restartPolicy", "Always") == "Never":
                    self.phase = "Failed"
                    self.mark()
                    await self.stopping.wait()
                    return
                await self.backoff(c)
            if self.stopping.is_set():
                return
            c.done = True
        loops = [asyncio.create_task(self.container_loop(c)) for c in self.containers]
        self.tasks.extend(loops)
        await asyncio.gather(*loops, return_exceptions=True)
        if not self.stopping.is_set():
            codes = [c.state.get("terminated", {}).get("exitCode", 1) for c in self.containers]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            self.mark()
            await self.stopping.wait()

    async def container_loop(self, c: Container) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while not self.stopping.is_set():
            code = await self.run_once(c)
            if self.stopping.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                c.done = True
                return
            await self.backoff(c)

    async def backoff(self, c: Container) -> None:
        ran = time.monotonic() - getattr(c, "_started_at", time.monotonic())
        if ran > 600:
            c._backoff_n = 0  # type: ignore[attr-defined]
        n = getattr(c, "_backoff_n", 0)
        delay = min(self.agent.cfg.backoff_base * 2 ** n, BACKOFF_MAX)
        c._backoff_n = n + 1  # type: ignore[attr-defined]
        c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
            f"back-off {delay:.0f}s restarting failed container={c.name} pod={self.name}_{self.ns}({self.uid})")}}
        c.ready = False
        self.mark()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        if not self.stopping.is_set():
            c.restart_count += 1

    async def run_once(self, c: Container) -> int:
        """Start the container, probe it, wait for it to exit; returns the exit code."""
        if self.stopping.is_set():
            return 0
        image = self.agent.cfg.image(c.spec["image"]) or {}
        try:
            env = await self.env(c, image)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
            self.mark()
            return 1
        cdir = self.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term_file = cdir / "termination-log"
        term_file.write_text("")
        sc = {**(self.pod["spec"].get("securityContext") or {}), **(c.spec.get("securityContext") or {})}
        uid, gid = int(sc.get("runAsUser", 0)), int(sc.get("runAsGroup", sc.get("runAsUser", 0)))
        os.chown(term_file, uid, gid)
        groups = [gid, *(self.pod["spec"].get("securityContext") or {}).get("supplementalGroups", [])]
        if "fsGroup" in (self.pod["spec"].get("securityContext") or {}):
            groups.append(int(self.pod["spec"]["securityContext"]["fsGroup"]))
        mounts = []
        for m in c.spec.get("volumeMounts") or []:
            src = self.volumes.get(m["name"])
            if src is None:
                continue
            if m.get("subPath"):
                src = os.path.join(src, m["subPath"])
            mounts.append({"source": src, "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
        argv = [expand(a, env) for a in (c.spec.get("command") or []) + (c.spec.get("args") or [])]
        if not argv:
            argv = list(image.get("entrypoint") or [])
        spec = {"netns": f"/run/netns/{self.netns}", "root": str(cdir / "rootfs"), "binds": image.get("binds", []),
                "mounts": mounts, "termination_log": {"host": str(term_file),
                                                      "path": c.spec.get("terminationMessagePath", "/dev/termination-log")},
                "read_only_root": bool(sc.get("readOnlyRootFilesystem")), "uid": uid, "gid": gid,
                "groups": sorted(set(groups)), "hostname": self.name[:63], "workdir": c.spec.get("workingDir") or "/", "argv": argv, "env": env,
                "parent": os.getpid()}
        spec_file = cdir / "spec.json"
        spec_file.write_text(json.dumps(spec))
        log_file = self.log_dir / c.name / f"{c.restart_count}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            c.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.cluster.launch", str(spec_file), stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True, cwd=str(REPO))
        (cdir / "pid").write_text(str(c.proc.pid))
        c._started_at = time.monotonic()  # type: ignore[attr-defined]
        c.state = {"running": {"startedAt": now()}}
        probes = {k: c.spec.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        c.started = probes["startupProbe"] is None
        c.ready = probes["readinessProbe"] is None and not c.init
        if not c.init:
            self.phase = "Running"
        self.mark()
        probe_task = asyncio.create_task(self.probe(c, probes)) if not c.init else None
        code = await c.proc.wait()
        if probe_task:
            probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe_task
        c.ready = False
        c.started = False
        message = term_file.read_text(errors="replace").strip()
        if not message and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join(log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])[-2048:]
        term = {"exitCode": code if code >= 0 else 128 - code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.state.get("running", {}).get("startedAt", now()), "finishedAt": now(),
                "containerID": f"proc://{self.uid}/{c.name}/{c.restart_count}"}
        if code < 0:
            term["signal"] = -code
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        c.last_state = {"terminated": term}
        if c.init and code == 0:
            c.state = {"terminated": term}
        self.mark()
        return term["exitCode"]

    # ----- probes ----------------------------------------------------------------------------
    async def check(self, c: Container, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                code = await http_get(h.get("host") or self.pod_ip, self.port(c, h["port"]), h.get("path", "/"), timeout,
                                      h.get("scheme", "HTTP"))
                return 200 <= code < 400
            if "tcpSocket" in probe:
                _, w = await asyncio.wait_for(asyncio.open_connection(self.pod_ip, self.port(c, probe["tcpSocket"]["port"])),
                                              timeout)
                w.close()
                return True
            if "exec" in probe:
                return await self.exec_in(c, probe["exec"]["command"], timeout) == 0
        except (OSError, asyncio.TimeoutError, ValueError, IndexError, ssl.SSLError):
            return False
        return False

    def port(self, c: Container, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port}")

    async def exec_in(self, c: Container, command: list[str], timeout: float) -> int:
        if c.proc is None or c.proc.returncode is not None:
            return 1
        sc = {**(self.pod["spec"].get("securityContext") or {}), **(c.spec.get("securityContext") or {})}
        uid, gid = str(sc.get("runAsUser", 0)), str(sc.get("runAsGroup", sc.get("runAsUser", 0)))
        proc = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(c.proc.pid), "-m", "-n", "-r", "-w", "-S", uid, "-G", gid, "--", *command,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            return 1

    async def probe(self, c: Container, probes: dict[str, Any]) -> None:
        startup = probes["startupProbe"]
        if startup:
            if not await self.probe_until(c, startup, want=True):
                await self.kill(c, "startup probe failed")
                return
            c.started = True
            self.mark()
        tasks = []
        if probes["readinessProbe"]:
            tasks.append(asyncio.create_task(self.readiness(c, probes["readinessProbe"])))
        if probes["livenessProbe"]:
            tasks.append(asyncio.create_task(self.liveness(c, probes["livenessProbe"])))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def probe_until(self, c: Container, probe: dict[str, Any], want: bool) -> bool:
        """Probe until ``successThreshold`` successes (True) or ``failureThreshold`` failures (False)."""
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        ok_n = bad_n = 0
        while True:
            if await self.check(c, probe):
                ok_n, bad_n = ok_n + 1, 0
                if ok_n >= int(probe.get("successThreshold", 1)):
                    return True
            else:
                ok_n, bad_n = 0, bad_n + 1
                if bad_n >= int(probe.get("failureThreshold", 3)):
                    return False
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def readiness(self, c: Container, probe: dict[str, Any]) -> None:
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        ok_n = bad_n = 0
        while True:
            if await self.check(c, probe):
                ok_n, bad_n = ok_n + 1, 0
                if ok_n >= int(probe.get("successThreshold", 1)) and not c.ready:
                    c.ready = True
                    self.mark()
            else:
                ok_n, bad_n = 0, bad_n + 1
                if bad_n >= int(probe.get("failureThreshold", 3)) and c.ready:
                    c.ready = False
                    self.mark()
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def liveness(self, c: Container, probe: dict[str, Any]) -> None:
        if not await self.probe_until(c, {**probe, "successThreshold": 10**9}, want=False):
            await self.kill(c, "liveness probe failed")

    async def kill(self, c: Container, why: str) -> None:
        log.info("Killing container pod=%s/%s container=%s reason=%r", self.ns, self.name, c.name, why)
        grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        await self.stop_container(c, float(grace), run_pre_stop=True)

    # ----- stopping --------------------------------------------------------------------------
    async def pre_stop(self, c: Container) -> None:
        hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
        try:
            if "sleep" in hook:
                await asyncio.sleep(float(hook["sleep"]["seconds"]))
            elif "httpGet" in hook:
                h = hook["httpGet"]
                await http_get(h.get("host") or self.pod_ip, self.port(c, h["port"]), h.get("path", "/"), 30,
                               h.get("scheme", "HTTP"))
            elif "exec" in hook:
                await self.exec_in(c, hook["exec"]["command"], 30)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.info("PreStop hook failed pod=%s/%s container=%s error=%s", self.ns, self.name, c.name, exc)

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
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def terminate(self) -> None:
        """The pod is being deleted: stop its containers within the grace period, clean up, finish."""
        grace = float(self.pod["metadata"].get("deletionGracePeriodSeconds",
                                                self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        await asyncio.gather(*(self.stop_container(c, grace, run_pre_stop=True) for c in self.containers))
        for c in self.init_containers:
            await self.stop_container(c, 0, run_pre_stop=False)
        for t in self.tasks:
            t.cancel()
        await asyncio.to_thread(self.agent.net.remove_pod, self.index)
        self.agent.release(self)
        if not self.agent.force_deleted(self.uid):
            with contextlib.suppress(KubeError):
                await self.agent.call("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                                      {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                       "preconditions": {"uid": self.uid}})
        log.info("Pod removed pod=%s/%s", self.ns, self.name)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$(VAR) escapes it); unknown variables stay as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


REPO = Path(__file__).resolve().parents[2]
NODE_API_PORT = 6443


def listen_in_netns(netns: str, host: str, port: int) -> "socket.socket":
    """A listening socket inside another network namespace (setns on a throwaway thread: the
    socket keeps its namespace, the rest of the process stays in the root one)."""
    import ctypes
    import socket

    result: list[Any] = []

    def work() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            if libc.setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
            result.append(sock)
        except OSError as exc:
            result.append(exc)
        # The thread ends here, in the other namespace; no other code runs on it.

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


async def forward(netns: str, port: int, target_port: int) -> asyncio.AbstractServer:
    """Node-namespace 127.0.0.1:<port> → root-namespace 127.0.0.1:<target_port>: servers of the root
    namespace stay on loopback (the apiserver, KEDA's gRPC), and what runs inside the node namespace
    (kube-proxy, KEDA's metrics apiserver) still reaches them."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            w1.close()
            return
        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    return await asyncio.start_server(handle, sock=listen_in_netns(netns, "127.0.0.1", port))


# ==================================================================== the node


class Agent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.net = Network(cfg.slot)
        self.kube = Kube(cfg.kubeconfig_server, cfg.ca, cfg.cert, cfg.key)
        self.workers: dict[str, PodWorker] = {}
        self.gone: set[str] = set()
        self.loop: asyncio.AbstractEventLoop

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
            await self.call("DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                             "preconditions": {"uid": m["uid"]}})

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
        cap = {"cpu": self.cfg.cpu, "memory": self.cfg.memory, "pods": str(self.net.ranges.max_pods),
               "ephemeral-storage": "100Gi"}
        conds = [{"type": k, "status": "False", "reason": f"KubeletHas{v}", "lastHeartbeatTime": t,
                  "lastTransitionTime": self.started}
                 for k, v in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                              ("PIDPressure", "SufficientPID"))]
        conds.append({"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": t,
                      "lastTransitionTime": self.started, "message": "process node agent is posting ready status"})
        return {"capacity": cap, "allocatable": cap, "conditions": conds,
                "addresses": [{"type": "InternalIP", "address": self.net.ranges.node_ip},
                              {"type": "Hostname", "address": self.cfg.node}],
                "nodeInfo": {"kubeletVersion": "v1.36.3-procnode", "kubeProxyVersion": "", "operatingSystem": "linux",
                             "architecture": "amd64", "containerRuntimeVersion": "procnode://1",
                             "osImage": "autoglm process node", "kernelVersion": os.uname().release,
                             "machineID": "", "systemUUID": "", "bootID": ""}}

    async def heartbeat(self) -> None:
        while True:
            try:
                await self.call("PATCH", f"/api/v1/nodes/{self.cfg.node}/status", {"status": self.node_status()},
                                "application/strategic-merge-patch+json")
            except Exception as exc:  # noqa: BLE001
                log.warning("Node heartbeat failed error=%s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.started = now()
        stop = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(s, stop.set)
        servers = []
        for port, target in ([[NODE_API_PORT, self.cfg.api_port]] if self.cfg.api_port else []) + self.cfg.forwards:
            servers.append(await forward(self.net.node_ns, port, target))
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
            await asyncio.gather(*(w.stop_container(c, 2, run_pre_stop=False) for c in w.containers + w.init_containers))


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = NodeConfig.load(argv[1])
    asyncio.run(Agent(cfg).main())


if __name__ == "__main__":
    main(sys.argv)
