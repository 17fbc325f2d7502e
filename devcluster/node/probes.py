"""Startup, readiness and liveness probes (``httpGet``, ``tcpSocket``, ``exec``) with their periods
and thresholds, as the kubelet runs them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devcluster.node.container import Container
    from devcluster.node.pod import PodWorker


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
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.36\r\n"
                f"Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await reader.readline()
            return int(line.split()[1])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)


def port_of(c: Container, port: Any) -> int:
    """A probe's or hook's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in c.spec.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"no port named {port}")


class Prober:
    """Runs one pod's probes; ``kill(container, why)`` restarts a container whose probe failed."""

    def __init__(self, worker: PodWorker, kill: Callable[[Container, str], Awaitable[None]]) -> None:
        self.w = worker
        self.kill = kill

    async def exec_in(self, c: Container, command: list[str], timeout: float) -> int:
        """Run ``command`` inside the container (its mount and network namespaces, root and user)."""
        if c.proc is None or c.proc.returncode is not None:
            return 1
        uid, gid = (str(i) for i in c.user(self.w.pod))
        proc = await asyncio.create_subprocess_exec(
            "nsenter",
            "-t",
            str(c.proc.pid),
            "-m",
            "-n",
            "-r",
            "-w",
            "-S",
            uid,
            "-G",
            gid,
            "--",
            *command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            return 1

    async def check(self, c: Container, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                code = await http_get(
                    h.get("host") or self.w.pod_ip,
                    port_of(c, h["port"]),
                    h.get("path", "/"),
                    timeout,
                    h.get("scheme", "HTTP"),
                )
                return 200 <= code < 400
            if "tcpSocket" in probe:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(self.w.pod_ip, port_of(c, probe["tcpSocket"]["port"])), timeout
                )
                w.close()
                return True
            if "exec" in probe:
                return await self.exec_in(c, probe["exec"]["command"], timeout) == 0
        except (TimeoutError, OSError, ValueError, IndexError, ssl.SSLError):
            return False
        return False

    async def run(self, c: Container) -> None:
        """A started container's probes: startup first, then readiness and liveness side by side."""
        startup = c.spec.get("startupProbe")
        if startup:
            if not await self.probe_until(c, startup):
                await self.kill(c, "startup probe failed")
                return
            c.started = True
            self.w.mark()
        tasks = []
        if c.spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self.readiness(c, c.spec["readinessProbe"])))
        if c.spec.get("livenessProbe"):
            tasks.append(asyncio.create_task(self.liveness(c, c.spec["livenessProbe"])))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def probe_until(self, c: Container, probe: dict[str, Any]) -> bool:
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
                    self.w.mark()
            else:
                ok_n, bad_n = 0, bad_n + 1
                if bad_n >= int(probe.get("failureThreshold", 3)) and c.ready:
                    c.ready = False
                    self.w.mark()
            await asyncio.sleep(float(probe.get("periodSeconds", 10)))

    async def liveness(self, c: Container, probe: dict[str, Any]) -> None:
        if not await self.probe_until(c, {**probe, "successThreshold": 10**9}):
            await self.kill(c, "liveness probe failed")
