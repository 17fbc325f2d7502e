"""``python -m devcluster up|down|status|logs`` (``make cluster-up`` / ``make cluster-down``): a
cluster in the background, run by a supervisor process (``serve``), state in ``--dir``
(default ``<repo>/.cache/cluster``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from devcluster import addons
from devcluster.binaries import build_binaries
from devcluster.cluster import Cluster
from devcluster.controlplane.nodes import PROC_NODE
from devcluster.images import REPO
from devcluster.network import cleanup_stale
from devcluster.processes import kill_recorded


def _serve(workdir: Path, names: list[str]) -> None:
    """Run in the background: start the cluster, wait for SIGTERM/SIGINT, stop it."""
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = workdir / "status"
    try:
        c = Cluster.start(workdir, addons=names)
    except BaseException as exc:  # noqa: BLE001 - reported through the status file
        status.write_text(f"failed: {exc}")
        raise SystemExit(1) from None
    status.write_text("ready")
    try:
        while not stop:
            c.processes.check_alive()
            time.sleep(0.5)
    finally:
        c.stop()
        status.write_text("stopped")


def _up(d: Path, names: list[str]) -> int:
    _down(d, quiet=True)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    build_binaries()  # in the foreground, so its output is seen
    t0 = time.monotonic()
    log = open(d / "supervisor.log", "wb")
    sup = subprocess.Popen(
        [sys.executable, "-m", "devcluster", "serve", "--dir", str(d), "--addons", *names],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (d / "supervisor.pid").write_text(str(sup.pid))
    status = d / "status"
    while not status.exists():
        if sup.poll() is not None:
            print((d / "supervisor.log").read_text(), file=sys.stderr)
            return 1
        time.sleep(0.2)
    if status.read_text() != "ready":
        print(status.read_text(), file=sys.stderr)
        return 1
    info = json.loads((d / "cluster.json").read_text())
    print("\n".join(summary(d, info, time.monotonic() - t0)))
    return 0


def summary(d: Path, info: dict, seconds: float) -> list[str]:
    """What ``up`` prints: the cluster, its add-ons, their ``KEY=value`` lines (``HYDRA_ISSUER=...``:
    acceptance checks read them), and ``export KUBECONFIG=...`` last."""
    lines = [
        f"Local cluster ready in {seconds:.1f}s (logs in {d}); stop it with `make cluster-down`.",
        f"Process node {PROC_NODE}: pods {info['pod_range']}, services {info['service_range']}; "
        f"container logs in {d / 'procnode' / 'logs'}",
        f"Prometheus: {info['prometheus']}",
    ]
    extra = [n for n in info["addons"] if n not in addons.DEFAULT]
    if extra:
        lines.append(f"Add-ons: {', '.join(extra)}")
    lines += [f"{key}={value}" for key, value in (info.get("exports") or {}).items()]
    return [*lines, f"export KUBECONFIG={d / 'kubeconfig'}"]


def _down(d: Path, quiet: bool = False) -> int:
    pidfile = d / "supervisor.pid"
    if pidfile.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.2)
        pidfile.unlink(missing_ok=True)
    kill_recorded(d)  # anything the supervisor left behind (it was killed hard, say)
    cleanup_stale()  # the process node's network, if its owner died without removing it
    if not quiet:
        print(f"Local cluster in {d} stopped.")
    return 0


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _status(d: Path) -> int:
    """Whether the cluster runs; its processes; its add-ons. Exit 0 when it runs, 1 when not."""
    status = (d / "status").read_text() if (d / "status").exists() else "not started"
    running = status == "ready" and _alive(d / "supervisor.pid")
    print(f"Local cluster in {d}: {'running' if running else status if status != 'ready' else 'dead'}")
    info: dict = {}
    if (d / "cluster.json").exists():
        info = json.loads((d / "cluster.json").read_text())
        print(f"Add-ons: {', '.join(info.get('addons') or []) or '-'}; Prometheus: {info.get('prometheus')}")
        for key, value in (info.get("exports") or {}).items() if running else ():
            print(f"{key}={value}")
    for p in sorted((d / "pids").glob("*")) if (d / "pids").exists() else []:
        print(f"  {p.name:24} {'up' if _alive(p) else 'down'}")
    if running:
        print(f"export KUBECONFIG={d / 'kubeconfig'}")
    return 0 if running else 1


def _logs(d: Path, name: str | None, lines: int) -> int:
    """A component's log (``kube-apiserver``...), a pod's (``NAMESPACE/POD[/CONTAINER]``), or the list."""
    if name is None:
        for f in sorted(d.glob("*.log")):
            print(f"{f.stem:24} {f.stat().st_size:>10} bytes  {f}")
        print(f"pods: {d / 'procnode' / 'logs'} (NAMESPACE/POD[/CONTAINER])")
        return 0
    if "/" in name:
        ns, pod, *rest = name.split("/")
        files = sorted(
            (d / "procnode" / "logs").glob(f"{ns}_{pod}_*/{rest[0] if rest else '*'}/*.log"),
            key=lambda p: (p.parent.name, int(p.stem)),
        )
    else:
        files = [d / f"{name}.log"]
    files = [f for f in files if f.exists()]
    if not files:
        print(f"no log for {name} in {d}", file=sys.stderr)
        return 1
    text = "".join(f.read_text(errors="replace") for f in files)
    print("\n".join(text.splitlines()[-lines:]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devcluster", description="The local Kubernetes cluster.")
    ap.add_argument("command", choices=["up", "down", "status", "logs", "serve", "build"])
    ap.add_argument("name", nargs="?", help="logs: a component (kube-apiserver...) or NAMESPACE/POD[/CONTAINER]")
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "cluster")
    ap.add_argument(
        "--addons",
        nargs="*",
        default=[],
        help=f"add-ons to start besides {', '.join(addons.DEFAULT)} (known: {', '.join(addons.ADDONS)}); "
        "spaces or commas between names",
    )
    ap.add_argument("-n", "--lines", type=int, default=50, help="logs: how many lines")
    args = ap.parse_intermixed_args(argv)
    d: Path = args.dir.resolve()
    names = [n for a in args.addons for n in a.replace(",", " ").split()]
    try:
        names = addons.resolve(names)
    except ValueError as exc:
        ap.error(str(exc))
    if args.command == "build":
        print(build_binaries())
        return 0
    if args.command == "serve":
        _serve(d, names)
        return 0
    if args.command == "down":
        return _down(d)
    if args.command == "status":
        return _status(d)
    if args.command == "logs":
        return _logs(d, args.name, args.lines)
    return _up(d, names)
