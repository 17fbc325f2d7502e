"""One container: its state as the pod status shows it, and a run of it (pod spec → a process
started through ``launch.py``, its log file, its exit turned into a ``terminated`` state)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.node.config import ConfigError
from devcluster.node.env import expand

if TYPE_CHECKING:
    from devcluster.node.pod import PodWorker

LOG_TAIL_LINES = 80
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where `python -m devcluster.node.launch` imports from


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_argv(spec: dict[str, Any], image: dict[str, Any], env: dict[str, str]) -> list[str]:
    """As a container runtime: ``command`` replaces the image's entrypoint, ``args`` follow either;
    ``$(VAR)`` expanded."""
    command = spec.get("command") or image.get("entrypoint") or []
    return [expand(a, env) for a in [*command, *(spec.get("args") or [])]]


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
    done: bool = False  # init container finished successfully / terminated for good
    started_at: float = 0.0  # monotonic time of the last start (the back-off resets after 10 min)
    backoff_n: int = 0  # back-offs since the last reset

    @property
    def name(self) -> str:
        return self.spec["name"]

    def security_context(self, pod: dict[str, Any]) -> dict[str, Any]:
        return {**(pod["spec"].get("securityContext") or {}), **(self.spec.get("securityContext") or {})}

    def user(self, pod: dict[str, Any]) -> tuple[int, int]:
        """(uid, gid) the container runs as (``runAsUser``/``runAsGroup``, root by default)."""
        sc = self.security_context(pod)
        return int(sc.get("runAsUser", 0)), int(sc.get("runAsGroup", sc.get("runAsUser", 0)))

    def status(self, pod_uid: str) -> dict[str, Any]:
        st = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
            "started": self.started,
        }
        if self.proc is not None:
            st["containerID"] = f"proc://{pod_uid}/{self.name}/{self.restart_count}"
        return st


class Launcher:
    """Starts a pod's containers as processes and waits for them."""

    def __init__(self, worker: PodWorker) -> None:
        self.w = worker

    def launch_spec(self, c: Container, image: dict[str, Any], env: dict[str, str], term_file: Path) -> dict[str, Any]:
        """What ``launch.py`` needs: namespaces, root, mounts, user, command."""
        pod_spec = self.w.pod["spec"]
        sc = c.security_context(self.w.pod)
        uid, gid = c.user(self.w.pod)
        pod_sc = pod_spec.get("securityContext") or {}
        groups = [gid, *pod_sc.get("supplementalGroups", [])]
        if "fsGroup" in pod_sc:
            groups.append(int(pod_sc["fsGroup"]))
        argv = container_argv(c.spec, image, env)
        return {
            "netns": f"/run/netns/{self.w.netns}",
            "root": str(self.w.dir / "containers" / c.name / "rootfs"),
            "binds": image.get("binds", []),
            "mounts": self.w.volumes.mounts(c),
            "termination_log": {
                "host": str(term_file),
                "path": c.spec.get("terminationMessagePath", "/dev/termination-log"),
            },
            "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
            "uid": uid,
            "gid": gid,
            "groups": sorted(set(groups)),
            "hostname": self.w.name[:63],
            "workdir": c.spec.get("workingDir") or "/",
            "argv": argv,
            "env": env,
            "parent": os.getpid(),
        }

    async def run_once(self, c: Container) -> int:
        """Start the container, probe it, wait for it to exit; returns the exit code."""
        w = self.w
        if w.stopping.is_set():
            return 0
        image = w.agent.cfg.image(c.spec["image"]) or {}
        try:
            env = await w.resolver.env(c, image)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
            w.mark()
            return 1
        cdir = w.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term_file = cdir / "termination-log"
        term_file.write_text("")
        os.chown(term_file, *c.user(w.pod))
        spec_file = cdir / "spec.json"
        spec_file.write_text(json.dumps(self.launch_spec(c, image, env, term_file)))
        log_file = w.log_dir / c.name / f"{c.restart_count}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            c.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "devcluster.node.launch",
                str(spec_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=str(PACKAGE_ROOT),
            )
        (cdir / "pid").write_text(str(c.proc.pid))
        c.started_at = time.monotonic()
        c.state = {"running": {"startedAt": now()}}
        c.started = not c.spec.get("startupProbe")
        c.ready = not c.spec.get("readinessProbe") and not c.init
        if not c.init:
            w.phase = "Running"
        w.mark()
        probe_task = asyncio.create_task(w.prober.run(c)) if not c.init else None
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
        term = {
            "exitCode": code if code >= 0 else 128 - code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.state.get("running", {}).get("startedAt", now()),
            "finishedAt": now(),
            "containerID": f"proc://{w.uid}/{c.name}/{c.restart_count}",
        }
        if code < 0:
            term["signal"] = -code
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        c.last_state = {"terminated": term}
        w.mark()
        return term["exitCode"]
