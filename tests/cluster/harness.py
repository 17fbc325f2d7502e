"""A real single-node Kubernetes control plane for tests and the demo, with no Docker.

etcd → kube-apiserver (client-cert auth, RBAC, audit log) → kube-controller-manager (all
controllers) → kube-scheduler → kwok (fake nodes) → the process node ``proc-0`` (``procnode.py``:
pods really run, as processes) → kube-proxy (nftables, in the node's network namespace) →
Prometheus (pods discovered through the apiserver). Binaries come from
``tests/cluster/gobuild/build.sh`` (built from upstream Go modules, cached by version).

Where pods land: a CPU-only pod lands on ``proc-0`` and runs for real; GPU pods land on the fake
GPU nodes (tainted ``nvidia.com/gpu``; the ``ExtendedResourceToleration`` admission plugin lets
pods that ask for GPUs tolerate it), where kwok plays their lifecycle; ``kwok-cpu-0`` is tainted
``autoglm.io/simulated`` and takes only pods that tolerate it (the operator benchmark's 1,000+
pods): it is sized for them (``SIMULATED_CAPACITY``: 1,280 pods, 1,280 CPU, 5 TiB memory, enough
for 1,100+ pods of ``cpu: 1, memory: 2Gi``; kwok's pod IPs come from a /17). The GPU nodes keep
32 CPU / 256Gi / 110 pods. Network layout and its guarantees: ``network.py``. Needs root (namespaces, nftables).

Use it from Python (``with Cluster.start() as c: ...``) or the command line::

    python -m tests.cluster up [--dir DIR]    # start in the background, print `export KUBECONFIG=...`
    python -m tests.cluster down [--dir DIR]  # stop it
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.network import Network, cleanup_stale
from tests.cluster.procnode import NODE_API_PORT

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "gobuild" / "build.sh"

# Fake nodes (kwok): two GPU nodes (different products) and one CPU-only node for simulated pods.
# kwok-cpu-0 holds the operator benchmark (N = 1,000 resources of `cpu: 1, memory: 2Gi`, plus the
# surge of a rollout), so it is one big node rather than many small ones (fewer node heartbeats).
SIMULATED_CAPACITY = {"cpu": "1280", "memory": "5Ti", "pods": "1280"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
SIMULATED_TAINT = {"key": "autoglm.io/simulated", "value": "true", "effect": "NoSchedule"}
NODES = [
    ("kwok-gpu-0", {"nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.count": "8"}, {"nvidia.com/gpu": "8"},
     GPU_TAINT),
    ("kwok-gpu-1", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"},
     {"nvidia.com/gpu": "8"}, GPU_TAINT),
    ("kwok-cpu-0", {}, SIMULATED_CAPACITY, SIMULATED_TAINT),
]
PROC_NODE = "proc-0"
RUNTIME_IMAGE = "ghcr.io/autoglm/runtime"   # any tag runs the project's own `autoglm-runtime`
HOST_IMAGE = "autoglm.local/host"           # any tag: the host's own programs (tests' helper pods)
# The operator's own identity (a client certificate in group system:masters, CN below): its reads
# are audited too, so the benchmark and tests can count every request it makes, and nobody else's
# reads fill the log (kwok, the scheduler and the tests' kubectl polls are not recorded).
OPERATOR_USER = "autoglm-operator"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
# The apiserver audits every write (metadata only), so tests can count the writes a component makes,
# and the operator's reads (get/list/watch, metadata only; a watch is one request however long).
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: [{", ".join(f'"{v}"' for v in WRITE_VERBS)}]
- level: Metadata
  users: ["{OPERATOR_USER}"]
  verbs: ["get", "list", "watch"]
- level: None
"""
# Prometheus discovers pods through the apiserver and scrapes those annotated prometheus.io/scrape.
PROMETHEUS_CONFIG = """\
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: kubernetes-pods
  tls_config: {{insecure_skip_verify: true}}  # pods serving HTTPS (prometheus.io/scheme: https) use their own certificates
  kubernetes_sd_configs:
  - role: pod
    api_server: {api}
    tls_config: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}
  relabel_configs:
  - {{source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], regex: "true", action: keep}}
  - {{source_labels: [__meta_kubernetes_pod_phase], regex: Pending|Succeeded|Failed, action: drop}}
  - {{source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path], regex: (.+), target_label: __metrics_path__}}
  - {{source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scheme], regex: "(https?)", target_label: __scheme__}}
  - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
    regex: (.+);(\\d+)
    replacement: $1:$2
    target_label: __address__
  - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
  - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
  - {{source_labels: [__meta_kubernetes_pod_node_name], target_label: node}}
  - {{action: labelmap, regex: __meta_kubernetes_pod_label_(app_kubernetes_io_.+|autoglm_io_.+)}}
"""
# KEDA: its namespace, the metrics apiserver's Service (endpoints: the node's address, which the
# aggregator reaches directly with --enable-aggregator-routing) and its APIService.
KEDA_GRPC_PORT = 9666          # the operator's gRPC as seen from the node namespace (forwarded)
KEDA_ADAPTER_PORT = 6444       # the metrics apiserver, on the node's address
KEDA_OBJECTS = """\
apiVersion: v1
kind: Namespace
metadata: {{name: keda}}
---
apiVersion: v1
kind: Service
metadata: {{name: keda-metrics-apiserver, namespace: keda}}
spec:
  ports: [{{name: https, port: 443, targetPort: {port}, protocol: TCP}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: keda-metrics-apiserver, namespace: keda}}
subsets: [{{addresses: [{{ip: "{node_ip}"}}], ports: [{{name: https, port: {port}, protocol: TCP}}]}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: v1beta1.external.metrics.k8s.io}}
spec:
  service: {{name: keda-metrics-apiserver, namespace: keda, port: 443}}
  group: external.metrics.k8s.io
  version: v1beta1
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
"""
KWOK_STAGES = ["node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"]


def default_images() -> list[dict]:
    """The process node's image table: image repository → the host folders that make up its
    "image" (bound read-only into the container's root) and the image's environment."""
    venv = REPO / ".venv"
    python = (venv / "bin" / "python").resolve() if (venv / "bin" / "python").exists() else Path(sys.executable).resolve()
    prefix = str(python.parents[1])
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"]
    binds = system + ([prefix] if not prefix.startswith("/usr") else []) + [str(REPO)]
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return [
        {"match": RUNTIME_IMAGE, "binds": binds, "env": {"PATH": f"{venv / 'bin'}:{path}"},
         "entrypoint": ["autoglm-runtime"]},
        {"match": HOST_IMAGE, "binds": binds, "env": {"PATH": f"{venv / 'bin'}:{path}"}},
    ]


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


def make_pki(d: Path, service_ip: str) -> None:
    """A CA, an apiserver serving cert, an admin client cert (system:masters), a service-account key."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "365", "-subj", "/CN=autoglm-local-ca", cwd=d)
    (d / "server.ext").write_text(
        f"subjectAltName=IP:127.0.0.1,IP:{service_ip},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in [("server", "/CN=kube-apiserver", "server.ext"),
                            ("admin", "/O=system:masters/CN=admin", "client.ext"),
                            ("operator", f"/O=system:masters/CN={OPERATOR_USER}", "client.ext")]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "365", "-extfile", ext, cwd=d)
    # The aggregation layer (APIServices such as KEDA's external metrics): a front-proxy CA and the
    # client certificate the apiserver presents to extension apiservers.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "front-proxy-ca.key", "-out",
             "front-proxy-ca.crt", "-days", "365", "-subj", "/CN=autoglm-front-proxy-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "front-proxy-client.key", "-out",
             "front-proxy-client.csr", "-subj", "/CN=front-proxy-client", cwd=d)
    _openssl("x509", "-req", "-in", "front-proxy-client.csr", "-CA", "front-proxy-ca.crt", "-CAkey",
             "front-proxy-ca.key", "-CAcreateserial", "-out", "front-proxy-client.crt", "-days", "365",
             "-extfile", "client.ext", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def make_keda_certs(d: Path) -> None:
    """KEDA's CA and one certificate (server and client: the operator's gRPC and the metrics
    apiserver use it both ways) for its in-cluster names, as its cert rotation would make them."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "365", "-subj", "/CN=keda-local-ca", cwd=d)
    names = [f"{svc}.keda.svc{suffix}" for svc in ("keda-operator", "keda-metrics-apiserver")
             for suffix in ("", ".cluster.local")]
    (d / "tls.ext").write_text(f"subjectAltName={','.join('DNS:' + n for n in names)}\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
             "-subj", "/CN=keda-operator.keda.svc", cwd=d)
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tls.crt", "-days", "365", "-extfile", "tls.ext", cwd=d)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str = "admin") -> None:
    path.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: autoglm-local
          cluster: {{server: "{server}", certificate-authority: "{pki / 'ca.crt'}"}}
        users:
        - name: admin
          user: {{client-certificate: "{pki / f'{user}.crt'}", client-key: "{pki / f'{user}.key'}"}}
        contexts:
        - name: autoglm-local
          context: {{cluster: autoglm-local, user: admin, namespace: default}}
        current-context: autoglm-local
        """))


def nodes_manifest(pod_cidr: str) -> str:
    """The kwok nodes (annotated ``kwok.x-k8s.io/node: fake``, the only ones kwok manages) and
    ``proc-0`` (its agent fills in its status)."""
    docs = [
        f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {PROC_NODE}\n"
        f"  labels:\n    type: process\n    kubernetes.io/hostname: {PROC_NODE}\n    kubernetes.io/os: linux\n"
        f"    kubernetes.io/arch: amd64\n    node.kubernetes.io/instance-type: process\n"
        f"spec:\n  podCIDR: {pod_cidr}\n  podCIDRs: [{pod_cidr}]\n"
    ]
    for name, labels, extra, taint in NODES:
        all_labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                      "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "kwok", **labels}
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi", **extra}
        res = "".join(f"      {k}: \"{v}\"\n" for k, v in resources.items())
        lab = "".join(f"    {k}: \"{v}\"\n" for k, v in all_labels.items())
        docs.append(
            f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"
            f"  annotations:\n    kwok.x-k8s.io/node: fake\n    node.alpha.kubernetes.io/ttl: \"0\"\n"
            f"  labels:\n{lab}"
            f"spec:\n  taints:\n  - {{key: {taint['key']}, value: \"{taint['value']}\", effect: {taint['effect']}}}\n"
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
    net: Network | None = None        # the process node's network (None for a cluster reused by kubeconfig)
    prometheus_url: str = ""
    start_seconds: float = 0.0
    keda_grpc_port: int = 0

    @classmethod
    def attach(cls, kubeconfig: Path, bin_dir: Path) -> "Cluster":
        """A handle on a cluster started elsewhere (``make cluster-up``), from its ``cluster.json``."""
        info = json.loads((kubeconfig.parent / "cluster.json").read_text())
        return cls(dir=kubeconfig.parent, bin_dir=bin_dir, kubeconfig=kubeconfig, api_port=0,
                   net=Network(info["slot"]) if info.get("slot") else None, prometheus_url=info.get("prometheus", ""),
                   keda_grpc_port=info.get("keda_grpc_port", 0))

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

    @property
    def operator_kubeconfig(self) -> Path:
        """A kubeconfig for the operator's own identity (``OPERATOR_USER``, cluster-admin), whose
        reads are audited as well as its writes (``audit_events(user=OPERATOR_USER)``)."""
        return self.dir / "operator.kubeconfig"

    def audit_writes(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict]:
        """Write requests (create/update/patch/delete) the apiserver audited after the Unix time
        ``since``, optionally only from clients whose User-Agent starts with ``user_agent`` and in
        ``namespace``. Each entry is the audit event (verb, objectRef, userAgent, responseStatus...)."""
        return [ev for ev in self.audit_events(since, user_agent=user_agent, namespace=namespace)
                if ev.get("verb") in WRITE_VERBS]

    def audit_reads(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict]:
        """Like ``audit_writes``, for get/list requests (only ``OPERATOR_USER``'s reads are audited)."""
        return [ev for ev in self.audit_events(since, user_agent=user_agent, namespace=namespace)
                if ev.get("verb") in ("get", "list")]

    def audit_events(self, since: float = 0.0, user_agent: str = "", namespace: str = "",
                     user: str = "") -> list[dict]:
        """Every audited request (writes by anyone, reads by ``OPERATOR_USER``) after ``since``, one
        entry per request (a watch is logged when it starts and again when it ends: kept once),
        optionally filtered by User-Agent prefix, namespace and user name."""
        import json
        from datetime import datetime

        out = []
        seen: set[str] = set()
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
            if user and ev.get("user", {}).get("username") != user:
                continue
            if ev.get("auditID") in seen:
                continue
            seen.add(ev.get("auditID"))
            out.append(ev)
        return out

    # ----- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Path | None = None, bin_dir: Path | None = None, timeout: float = 90,
              host_paths: dict[str, str] | None = None, images: list[dict] | None = None) -> "Cluster":
        """Start a cluster. ``host_paths`` maps hostPath prefixes to folders of this machine for
        the process node (default: ``/models`` → ``<dir>/models``); ``images`` adds image-table rows."""
        if os.geteuid() != 0:
            raise ClusterError("the local cluster's process node needs root (network namespaces, nftables)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise ClusterError(f"`{tool}` is missing: run `bash scripts/system-deps.sh` (Debian packages "
                                   "iproute2, nftables)")
        bin_dir = bin_dir or build_binaries()
        owns = workdir is None
        d = Path(tempfile.mkdtemp(prefix="autoglm-cluster-")) if owns else workdir
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        net = Network.create(owner_pid=os.getpid())
        r = net.ranges
        etcd_port, peer_port, api_port, kcm_port, sched_port, prom_port, keda_grpc = _free_ports(7)
        pki = d / "pki"
        make_pki(pki, r.kubernetes_service_ip)
        kubeconfig = d / "kubeconfig"
        write_kubeconfig(kubeconfig, f"https://127.0.0.1:{api_port}", pki)
        write_kubeconfig(d / "operator.kubeconfig", f"https://127.0.0.1:{api_port}", pki, user="operator")
        c = cls(dir=d, bin_dir=bin_dir, kubeconfig=kubeconfig, api_port=api_port, owns_dir=owns, net=net,
                prometheus_url=f"http://127.0.0.1:{prom_port}", keda_grpc_port=keda_grpc)
        c.write_info()
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
                     f"--service-cluster-ip-range={r.service_range}", "--authorization-mode=Node,RBAC",
                     "--enable-admission-plugins=ExtendedResourceToleration",
                     f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                     "--requestheader-allowed-names=front-proxy-client",
                     "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                     "--requestheader-group-headers=X-Remote-Group",
                     "--requestheader-username-headers=X-Remote-User",
                     f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                     f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                     "--enable-aggregator-routing=true",
                     "--allow-privileged=true", "--enable-priority-and-fairness=false",
                     "--endpoint-reconciler-type=none", "--profiling=false", "--v=0")
            c.wait_api(timeout)
            common = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                      f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--leader-elect=false"]
            c._spawn("kube-controller-manager", "kube-controller-manager", *common, f"--secure-port={kcm_port}",
                     "--controllers=*", f"--service-account-private-key-file={pki / 'sa.key'}",
                     f"--root-ca-file={pki / 'ca.crt'}", f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                     f"--cluster-signing-key-file={pki / 'ca.key'}", "--use-service-account-credentials=true",
                     f"--service-cluster-ip-range={r.service_range}",
                     "--horizontal-pod-autoscaler-sync-period=5s", "--profiling=false")
            c._spawn("kube-scheduler", "kube-scheduler", *common, f"--secure-port={sched_port}", "--profiling=false")
            stages = d / "kwok-stages.yaml"
            stages.write_text("---\n".join((bin_dir / "stages" / f"{s}.yaml").read_text() for s in KWOK_STAGES))
            c._spawn("kwok", "kwok", f"--kubeconfig={kubeconfig}", f"--config={stages}",
                     "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                     "--node-lease-duration-seconds=40", f"--cidr={r.kwok_range}", f"--node-ip={r.kwok_node_ip}")
            c.kubectl("apply", "-f", "-", input=nodes_manifest(r.node_cidr))
            c._start_process_node(pki, host_paths, images)
            c._start_prometheus(pki, prom_port)
            c.wait_ready(timeout)
            c.start_seconds = time.monotonic() - t0
        except BaseException:
            c.stop()
            raise
        return c

    def _start_process_node(self, pki: Path, host_paths: dict[str, str] | None, images: list[dict] | None) -> None:
        models = self.dir / "models"
        models.mkdir(exist_ok=True)
        cfg = {"kubeconfig_server": f"https://127.0.0.1:{self.api_port}", "ca": str(pki / "ca.crt"),
               "cert": str(pki / "admin.crt"), "key": str(pki / "admin.key"), "node": PROC_NODE,
               "slot": self.net.slot, "state_dir": str(self.dir / "procnode"), "api_port": self.api_port,
               "forwards": [[KEDA_GRPC_PORT, self.keda_grpc_port]],
               "images": [*(images or []), *default_images()],
               "host_paths": host_paths or {"/models": str(models)}}
        (self.dir / "procnode.json").write_text(json.dumps(cfg, indent=1))
        self._spawn_argv("procnode", [sys.executable, "-m", "tests.cluster.procnode", str(self.dir / "procnode.json")],
                         cwd=REPO)
        # kube-proxy runs in the node's namespace and reaches the apiserver through the agent's forwarder.
        kc = self.dir / "kube-proxy.kubeconfig"
        write_kubeconfig(kc, f"https://127.0.0.1:{NODE_API_PORT}", pki)
        r = self.net.ranges
        self._spawn_argv("kube-proxy", ["ip", "netns", "exec", self.net.node_ns, str(self.bin_dir / "kube-proxy"),
                                        f"--kubeconfig={kc}", f"--hostname-override={PROC_NODE}", "--proxy-mode=nftables",
                                        f"--cluster-cidr={r.pod_range}", "--conntrack-max-per-core=0",
                                        "--healthz-bind-address=127.0.0.1:10256",
                                        "--metrics-bind-address=127.0.0.1:10249", "--v=0"])

    def _start_prometheus(self, pki: Path, port: int) -> None:
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(PROMETHEUS_CONFIG.format(api=f"https://127.0.0.1:{self.api_port}", ca=pki / "ca.crt",
                                                cert=pki / "admin.crt", key=pki / "admin.key"))
        self._spawn_argv("prometheus", [str(self.bin_dir / "prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'prometheus'}",
                                        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
                                        "--storage.tsdb.retention.time=2h", "--web.enable-lifecycle"])

    def start_keda(self, timeout: float = 90) -> float:
        """Install KEDA (CRDs, operator, metrics apiserver registered as v1beta1.external.metrics.k8s.io);
        returns the seconds it took. Idempotent. The operator runs in the root namespace (all its
        listeners on loopback); the metrics apiserver runs in the node's network namespace on the
        node's address, because the aggregator refuses loopback endpoints, and reaches the apiserver and
        the operator's gRPC through the node agent's forwarders."""
        if (self.dir / "keda.ready").exists():
            return 0.0
        t0 = time.monotonic()
        r = self.net.ranges
        self.kubectl("apply", "--server-side", "-f", str(self.bin_dir / "keda-crds"))
        self.kubectl("apply", "--server-side", "-f", "-", input=KEDA_OBJECTS.format(node_ip=r.node_ip, port=KEDA_ADAPTER_PORT))
        certs = self.dir / "keda-certs"
        make_keda_certs(certs)
        env = {"KUBECONFIG": str(self.kubeconfig), "WATCH_NAMESPACE": "", "POD_NAMESPACE": "keda",
               "KEDA_CLUSTER_OBJECT_NAMESPACE": "keda", "OPERATOR_NAME": "keda-operator", "POD_NAME": "keda-operator"}
        probe, metrics = _free_ports(2)
        self._spawn_argv("keda-operator", [str(self.bin_dir / "keda-operator"), "--leader-elect=false",
                                           f"--metrics-bind-address=127.0.0.1:{metrics}",
                                           f"--health-probe-bind-address=127.0.0.1:{probe}",
                                           f"--metrics-service-bind-address=127.0.0.1:{self.keda_grpc_port}",
                                           "--enable-cert-rotation=false", f"--cert-dir={certs}",
                                           "--enable-webhook-patching=false", "--enable-apiservice-patching=false",
                                           "--zap-log-level=info"], env=env)
        kc = self.dir / "kube-proxy.kubeconfig"  # the apiserver as seen from the node's namespace
        self._spawn_argv("keda-adapter", ["ip", "netns", "exec", self.net.node_ns, str(self.bin_dir / "keda-adapter"),
                                          f"--secure-port={KEDA_ADAPTER_PORT}", f"--bind-address={r.node_ip}",
                                          f"--cert-dir={certs}", f"--tls-cert-file={certs / 'tls.crt'}",
                                          f"--tls-private-key-file={certs / 'tls.key'}",
                                          f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                                          f"--kubeconfig={kc}", f"--lister-kubeconfig={kc}",
                                          f"--metrics-service-address=127.0.0.1:{KEDA_GRPC_PORT}",
                                          "--metrics-service-grpc-authority=keda-operator.keda.svc.cluster.local"],
                         env={**env, "KUBECONFIG": str(kc)})

        def available() -> bool:
            out = self.kubectl("get", "apiservice", "v1beta1.external.metrics.k8s.io", "-o",
                               "jsonpath={.status.conditions[?(@.type=='Available')].status}", check=False).stdout
            return out == "True"

        self._poll("KEDA's metrics apiserver Available", available, timeout)
        (self.dir / "keda.ready").write_text("")
        return time.monotonic() - t0

    def write_info(self) -> None:
        info = {"slot": self.net.slot if self.net else None, "prometheus": self.prometheus_url,
                "keda_grpc_port": self.keda_grpc_port,
                "service_range": self.net.ranges.service_range if self.net else None,
                "pod_range": self.net.ranges.pod_range if self.net else None}
        (self.dir / "cluster.json").write_text(json.dumps(info))

    def prometheus_query(self, promql: str) -> list[dict]:
        """Instant query against the cluster's Prometheus; returns the result vector."""
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def pod_log(self, namespace: str, pod: str, container: str = "runtime") -> str:
        """All logs of a process-node container (every restart, oldest first); kubectl logs does not work."""
        files = sorted((self.dir / "procnode" / "logs").glob(f"{namespace}_{pod}_*/{container}/*.log"),
                       key=lambda p: int(p.stem))
        return "".join(f.read_text(errors="replace") for f in files)

    @property
    def models_dir(self) -> Path:
        """The folder the process node shows pods as the hostPath ``/models``."""
        cfg = json.loads((self.dir / "procnode.json").read_text())
        return Path(cfg["host_paths"]["/models"])

    def container_rss_mib(self, namespace: str, pod: str, container: str) -> float:
        """Resident memory of a process-node container's process (MiB)."""
        uid = json.loads(self.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)["metadata"]["uid"]
        pid = int((self.dir / "procnode" / "pods" / uid / "containers" / container / "pid").read_text())
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {pid}")

    def _spawn(self, name: str, binary: str, *args: str) -> None:
        self._spawn_argv(name, [str(self.bin_dir / binary), *args])

    def _spawn_argv(self, name: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> None:
        log = open(self.dir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **env} if env else None,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd or self.dir,
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
            return len(out) == len(NODES) + 1 and all(s == "True" for s in out)

        self._poll("nodes Ready (kwok and proc-0)", nodes_ready, timeout)

        def prometheus_ready() -> bool:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            return False

        self._poll("Prometheus ready", prometheus_ready, timeout)

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
        if self.net is not None:
            self.net.teardown()
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
    info = json.loads((d / "cluster.json").read_text())
    print(f"Local cluster ready in {time.monotonic() - t0:.1f}s (logs in {d}); stop it with `make cluster-down`.")
    print(f"Process node {PROC_NODE}: pods {info['pod_range']}, services {info['service_range']}; "
          f"container logs in {d / 'procnode' / 'logs'}")
    print(f"Prometheus: {info['prometheus']}")
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
    cleanup_stale()  # the process node's network, if its owner died without removing it
    if not quiet:
        print(f"Local cluster in {d} stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
