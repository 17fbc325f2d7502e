"""The cluster's processes: each started in its own session with its log in ``<dir>/<name>.log``
and its pid in ``<dir>/pids/<name>`` (so ``down`` finds it after a crash), killed with its parent."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from devcluster.binaries import ClusterError
from devcluster.kube import KubeError

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the process that started us dies (even by SIGKILL),
    so an interrupted test run never leaves a cluster behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Processes:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd or self.dir,
            preexec_fn=die_with_parent,
        )
        (self.dir / "pids").mkdir(exist_ok=True)
        (self.dir / "pids" / name).write_text(str(self.procs[name].pid))

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with code {p.returncode}; last log lines:\n{tail}")

    def poll(self, what: str, check: Callable[[], object], timeout: float) -> None:
        """Wait until ``check()`` is true (an OSError or an API error counts as not yet), failing at
        once if one of the processes died."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if check():
                    return
            except (OSError, KubeError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.dir}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM every process group (reverse start order), SIGKILL what is left after 10 s."""
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(list(self.procs.values())):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def kill_recorded(d: Path) -> None:
    """SIGKILL every process group recorded in ``<d>/pids`` (what a killed supervisor left behind)."""
    for p in (d / "pids").glob("*") if (d / "pids").exists() else []:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(p.read_text()), signal.SIGKILL)
        p.unlink(missing_ok=True)


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of VmHWM (peak resident set) over the given processes, in MiB."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return total / 1024
