"""A real single-node Kubernetes control plane for tests and the demo, with no Docker.

etcd → kube-apiserver (client-cert auth, RBAC) → kube-controller-manager (all controllers) →
kube-scheduler → kwok (fake nodes; scheduled pods become Running/Ready). Binaries come from
``tests/cluster/gobuild/build.sh`` (built from upstream Go modules, cached by version).

What it is not: there is no kubelet and no container runtime, so pods never run real code;
kwok only plays their lifecycle (Pending → Running → Ready, deletion).

Use it from Python (``with Cluster.start() as c: ...``) or the command line::

    python -m tests.cluster up [--dir DIR]    # start in the background, print `export KUBECONFIG=...`
    python -m tests.cluster down [--dir DIR]  # stop it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "gobuild" / "build.sh"

# Fake nodes: two GPU nodes (different products) and one CPU-only node.
NODES = [
    ("kwok-gpu-0", {"nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.count": "8"}, {"nvidia.com/gpu": "8"}),
    ("kwok-gpu-1", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}, {"nvidia.com/gpu": "8"}),
    ("kwok-cpu-0", {}, {}),
]
# The apiserver audits every write (metadata only), so tests can count the writes a component makes.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
"""
KWOK_STAGES = ["node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"]


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message says why."""


def build_binaries() -> Path:
    """Build (or reuse from the cache) the control-plane binaries; return their folder."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"building the control-plane binaries failed (exit {proc.returncode}); see the build output above")
    return Path(proc.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the process that started us dies (even by SIGKILL),
    so an interrupted test run never leaves a control plane behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, an apiserver serving cert, an admin client cert (system:masters), a service-account key."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "365", "-subj", "/CN=autoglm-local-ca", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in [("server", "/CN=kube-apiserver", "server.ext"),
                            ("admin", "/O=system:masters/CN=admin", "client.ext")]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "365", "-extfile", ext, cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    path.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: autoglm-local
          cluster: {{server: "{server}", certificate-authority: "{pki / 'ca.crt'}"}}
        users:
        - name: admin
          user: {{client-certificate: "{pki / 'admin.crt'}", client-key: "{pki / 'admin.key'}"}}
        contexts:
        - name: autoglm-local
          context: {{cluster: autoglm-local, user: admin, namespace: default}}
        current-context: autoglm-local
        """))


def nodes_manifest() -> str:
    docs = []
    for name, labels, extra in NODES:
        all_labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                      "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "kwok", **labels}
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi", **extra}
        res = "".join(f"      {k}: \"{v}\"\n" for k, v in resources.items())
        lab = "".join(f"    {k}: \"{v}\"\n" for k, v in all_labels.items())
        docs.append(
            f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"
            f"  annotations:\n    kwok.x-k8s.io/node: fake\n    node.alpha.kubernetes.io/ttl: \"0\"\n"
            f"  labels:\n{lab}"
            f"status:\n  capacity:\n{res}  allocatable:\n{res}"
        )
    return "---\n".join(docs)


@dataclass
class Cluster:
    """A running control plane. ``kubeconfig`` is an admin kubeconfig for it."""

    dir: Path
    bin_dir: Path
    kubeconfig: Path
    api_port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    owns_dir: bool = False

    # ----- commands against it -------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
                "HELM_DATA_HOME": str(self.dir / "helm" / "data")}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.bin_dir / tool), *args], input=input, capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, check=check, timeout=timeout)

    def api_client(self):
        from kubernetes import client, config  # imported lazily: the harness works without it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def audit_writes(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict]:
        """Write requests (create/update/patch/delete) the apiserver audited after the Unix time
        ``since``, optionally only from clients whose User-Agent starts with ``user_agent`` and in
        ``namespace``. Each entry is the audit event (verb, objectRef, userAgent, responseStatus...)."""
        import json
        from datetime import datetime

        out = []
        path = self.dir / "audit.log"
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            ts = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if ts < since or not ev.get("userAgent", "").startswith(user_agent):
                continue
            if namespace and ev.get("objectRef", {}).get("namespace") != namespace:
                continue
            out.append(ev)
        return out

    # ----- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Path | None = None, bin_dir: Path | None = None, timeout: float = 90) -> "Cluster":
        bin_dir = bin_dir or build_binaries()
        owns = workdir is None
        d = Path(tempfile.mkdtemp(prefix="autoglm-cluster-")) if owns else workdir
        d.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port, kcm_port, sched_port = _free_ports(5)
        pki = d / "pki"
        make_pki(pki)
        kubeconfig = d / "kubeconfig"
        write_kubeconfig(kubeconfig, f"https://127.0.0.1:{api_port}", pki)
        c = cls(dir=d, bin_dir=bin_dir, kubeconfig=kubeconfig, api_port=api_port, owns_dir=owns)
        try:
            c._spawn("etcd", "etcd", f"--data-dir={d / 'etcd'}", "--unsafe-no-fsync", "--log-level=warn",
                     f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                     f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                     f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                     f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                     f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                     "--listen-metrics-urls=", "--quota-backend-bytes=4294967296")
            (d / "audit-policy.yaml").write_text(AUDIT_POLICY)
            c._spawn("kube-apiserver", "kube-apiserver",
                     f"--audit-policy-file={d / 'audit-policy.yaml'}", f"--audit-log-path={d / 'audit.log'}",
                     "--audit-log-format=json", "--audit-log-mode=blocking",
                     f"--etcd-servers=http://127.0.0.1:{etcd_port}", "--bind-address=127.0.0.1",
                     "--advertise-address=127.0.0.1", f"--secure-port={api_port}", f"--cert-dir={pki}",
                     f"--tls-cert-file={pki / 'server.crt'}", f"--tls-private-key-file={pki / 'server.key'}",
                     f"--client-ca-file={pki / 'ca.crt'}",
                     "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                     f"--service-account-key-file={pki / 'sa.pub'}",
                     f"--service-account-signing-key-file={pki / 'sa.key'}",
                     "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=Node,RBAC",
                     "--allow-privileged=true", "--enable-priority-and-fairness=false",
                     "--endpoint-reconciler-type=none", "--profiling=false", "--v=0")
            c.wait_api(timeout)
            common = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                      f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--leader-elect=false"]
            c._spawn("kube-controller-manager", "kube-controller-manager", *common, f"--secure-port={kcm_port}",
                     "--controllers=*", f"--service-account-private-key-file={pki / 'sa.key'}",
                     f"--root-ca-file={pki / 'ca.crt'}", f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                     f"--cluster-signing-key-file={pki / 'ca.key'}", "--use-service-account-credentials=true",
                     "--horizontal-pod-autoscaler-sync-period=5s", "--profiling=false")
            c._spawn("kube-scheduler", "kube-scheduler", *common, f"--secure-port={sched_port}", "--profiling=false")
            stages = d / "kwok-stages.yaml"
            stages.write_text("---\n".join((bin_dir / "stages" / f"{s}.yaml").read_text() for s in KWOK_STAGES))
            c._spawn("kwok", "kwok", f"--kubeconfig={kubeconfig}", f"--config={stages}", "--manage-all-nodes=true",
                     "--node-lease-duration-seconds=40", "--cidr=10.244.0.0/16", "--node-ip=10.244.0.1")
            c.kubectl("apply", "-f", "-", input=nodes_manifest())
            c.wait_ready(timeout)
        except BaseException:
            c.stop()
            raise
        return c

    def _spawn(self, name: str, binary: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([str(self.bin_dir / binary), *args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir,
                                            preexec_fn=_die_with_parent)
        (self.dir / "pids").mkdir(exist_ok=True)
        (self.dir / "pids" / name).write_text(str(self.procs[name].pid))

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with code {p.returncode}; last log lines:\n{tail}")

    def _poll(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.dir}")
            time.sleep(0.2)

    def wait_api(self, timeout: float) -> None:
        self._poll("kube-apiserver /readyz", lambda: self.kubectl("get", "--raw=/readyz", check=False,
                                                                   timeout=10).returncode == 0, timeout)

    def wait_ready(self, timeout: float) -> None:
        self._poll("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False, timeout=10).returncode == 0, timeout)

        def nodes_ready() -> bool:
            out = self.kubectl("get", "nodes", "-o",
                               "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{' '}{end}",
                               check=False, timeout=10).stdout.split()
            return len(out) == len(NODES) and all(s == "True" for s in out)

        self._poll("kwok nodes Ready", nodes_ready, timeout)

    def stop(self) -> None:
        """Stop every process (reverse start order), then remove the temp dir if we made it."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of VmHWM (peak resident set) over the given processes, in MiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


# ----- command line: background cluster for `make cluster-up` / `make cluster-down` ------------------
def _serve(workdir: Path) -> None:
    """Run in the background: start the cluster, wait for SIGTERM/SIGINT, stop it."""
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = workdir / "status"
    try:
        c = Cluster.start(workdir)
    except BaseException as exc:  # noqa: BLE001 - reported through the status file
        status.write_text(f"failed: {exc}")
        raise SystemExit(1)
    status.write_text("ready")
    try:
        while not stop:
            c._check_alive()
            time.sleep(0.5)
    finally:
        c.stop()
        status.write_text("stopped")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "serve", "build"])
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "cluster")
    args = ap.parse_args(argv)
    d: Path = args.dir.resolve()
    if args.command == "build":
        print(build_binaries())
        return 0
    if args.command == "serve":
        _serve(d)
        return 0
    if args.command == "down":
        return _down(d)
    # up
    _down(d, quiet=True)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    build_binaries()  # in the foreground, so its output is seen
    t0 = time.monotonic()
    log = open(d / "supervisor.log", "wb")
    sup = subprocess.Popen([sys.executable, "-m", "tests.cluster", "serve", "--dir", str(d)], cwd=REPO,
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
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
    print(f"Local cluster ready in {time.monotonic() - t0:.1f}s (logs in {d}); stop it with `make cluster-down`.")
    print(f"export KUBECONFIG={d / 'kubeconfig'}")
    return 0


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
    # Anything the supervisor left behind (it was killed hard, say).
    for p in (d / "pids").glob("*") if (d / "pids").exists() else []:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(p.read_text()), signal.SIGKILL)
        p.unlink(missing_ok=True)
    if not quiet:
        print(f"Local cluster in {d} stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
