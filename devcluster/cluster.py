"""A running local cluster: start it, stop it, and the commands tests and benchmarks run against it.

``Cluster.start()`` brings up, in order: the process node's network (``network``), certificates and
kubeconfigs (``controlplane``), etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok,
the Node objects, the process node's agent (``node``), kube-proxy, then the add-ons (``addons``:
CoreDNS and Prometheus always, KEDA... by name). Needs root (namespaces, nftables).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devcluster import addons as addon_registry
from devcluster.audit import OPERATOR_USER, POLICY, AuditLog
from devcluster.binaries import ClusterError, build_binaries
from devcluster.controlplane import components
from devcluster.controlplane.kubeconfig import write_kubeconfig
from devcluster.controlplane.nodes import NODE_COUNT, PROC_NODE, nodes
from devcluster.controlplane.pki import make_pki
from devcluster.images import REPO, default_images
from devcluster.kube import Kube
from devcluster.network import Network
from devcluster.node.config import NODE_API_PORT
from devcluster.processes import Processes, free_ports


@dataclass
class Cluster:
    """A running cluster. ``kubeconfig`` is an admin kubeconfig for it."""

    dir: Path
    bin_dir: Path
    kubeconfig: Path
    api_port: int
    owns_dir: bool = False
    net: Network | None = None  # the process node's network (None for a cluster reused by kubeconfig)
    prometheus_url: str = ""
    start_seconds: float = 0.0
    keda_grpc_port: int = 0
    addons: list[str] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)  # what add-ons tell users (HYDRA_ISSUER=...)
    processes: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.processes = Processes(self.dir)
        self.audit = AuditLog(self.dir / "audit.log")

    @classmethod
    def attach(cls, kubeconfig: Path, bin_dir: Path) -> Cluster:
        """A handle on a cluster started elsewhere (``make cluster-up``), from its ``cluster.json``."""
        info = json.loads((kubeconfig.parent / "cluster.json").read_text())
        return cls(
            dir=kubeconfig.parent,
            bin_dir=bin_dir,
            kubeconfig=kubeconfig,
            api_port=info.get("api_port", 0),
            net=Network(info["slot"]) if info.get("slot") else None,
            prometheus_url=info.get("prometheus", ""),
            keda_grpc_port=info.get("keda_grpc_port", 0),
            addons=info.get("addons", []),
            exports=info.get("exports", {}),
        )

    # ----- commands against it -------------------------------------------------------------
    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.processes.procs

    @functools.cached_property
    def kube(self) -> Kube:
        """The package's API client (admin)."""
        pki = self.dir / "pki"
        return Kube(
            f"https://127.0.0.1:{self.api_port}", str(pki / "ca.crt"), str(pki / "admin.crt"), str(pki / "admin.key")
        )

    @property
    def network(self) -> Network:
        """The process node's network (a handle attached without one cannot start add-ons)."""
        if self.net is None:
            raise ClusterError(f"no process-node network known for the cluster in {self.dir}")
        return self.net

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.dir / "helm" / "data"),
        }

    def run(
        self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / tool), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, check=check, timeout=timeout)

    def api_client(self):
        """A ``kubernetes`` client (the project's tests' client; imported lazily: the package works without it)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def operator_kubeconfig(self) -> Path:
        """A kubeconfig for the operator's own identity (``OPERATOR_USER``, cluster-admin), whose
        reads are audited as well as its writes (``audit_events(user=OPERATOR_USER)``)."""
        return self.dir / "operator.kubeconfig"

    @property
    def node_kubeconfig(self) -> Path:
        """A kubeconfig for what runs in the node's network namespace (kube-proxy, CoreDNS, KEDA's
        metrics apiserver): the apiserver through the node agent's forwarder."""
        return self.dir / "kube-proxy.kubeconfig"

    def audit_writes(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict]:
        """See ``AuditLog.writes``."""
        return self.audit.writes(since, user_agent=user_agent, namespace=namespace)

    def audit_reads(self, since: float = 0.0, user_agent: str = "", namespace: str = "") -> list[dict]:
        """See ``AuditLog.reads``."""
        return self.audit.reads(since, user_agent=user_agent, namespace=namespace)

    def audit_events(self, since: float = 0.0, user_agent: str = "", namespace: str = "", user: str = "") -> list[dict]:
        """See ``AuditLog.events``."""
        return self.audit.events(since, user_agent=user_agent, namespace=namespace, user=user)

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
        files = sorted(
            (self.dir / "procnode" / "logs").glob(f"{namespace}_{pod}_*/{container}/*.log"), key=lambda p: int(p.stem)
        )
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

    # ----- add-ons -----------------------------------------------------------------------------
    def start_addon(self, name: str, timeout: float = 90) -> float:
        """Start add-on ``name`` and wait until it serves; returns the seconds it took (0 if it was
        running already, in this cluster or the one attached to)."""
        marker = self.dir / "addons" / f"{name}.ready"
        if marker.exists():
            return 0.0
        module = addon_registry.ADDONS[addon_registry.resolve([name])[-1]]
        t0 = time.monotonic()
        module.start(self)
        module.wait(self, timeout)
        marker.parent.mkdir(exist_ok=True)
        marker.write_text("")
        if name not in self.addons:
            self.addons.append(name)
        self.write_info()
        return time.monotonic() - t0

    def start_keda(self, timeout: float = 90) -> float:
        """KEDA in this cluster (``start_addon("keda")``); returns the seconds it took."""
        return self.start_addon("keda", timeout)

    def write_info(self) -> None:
        r = self.net.ranges if self.net else None
        info = {
            "slot": self.net.slot if self.net else None,
            "api_port": self.api_port,
            "prometheus": self.prometheus_url,
            "keda_grpc_port": self.keda_grpc_port,
            "addons": self.addons,
            "exports": self.exports,
            "service_range": r.service_range if r else None,
            "pod_range": r.pod_range if r else None,
        }
        (self.dir / "cluster.json").write_text(json.dumps(info))

    # ----- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        bin_dir: Path | None = None,
        timeout: float = 90,
        host_paths: dict[str, str] | None = None,
        images: list[dict] | None = None,
        addons: list[str] | None = None,
    ) -> Cluster:
        """Start a cluster. ``host_paths`` maps hostPath prefixes to folders of this machine for
        the process node (default: ``/models`` → ``<dir>/models``); ``images`` adds image-table rows;
        ``addons`` names add-ons to start besides the default ones."""
        names = addon_registry.resolve(addons or [])
        if os.geteuid() != 0:
            raise ClusterError("the local cluster's process node needs root (network namespaces, nftables)")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise ClusterError(
                    f"`{tool}` is missing: run `bash scripts/system-deps.sh` (Debian packages iproute2, nftables)"
                )
        bin_dir = bin_dir or build_binaries()
        owns = workdir is None
        d = Path(tempfile.mkdtemp(prefix="autoglm-cluster-")) if workdir is None else workdir
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        net = Network.create(owner_pid=os.getpid())
        r = net.ranges
        *pp, prom_port, keda_grpc = free_ports(7)
        ports = components.Ports(*pp)
        pki = d / "pki"
        make_pki(pki, [r.kubernetes_service_ip, r.node_ip], OPERATOR_USER)
        kubeconfig = d / "kubeconfig"
        api = f"https://127.0.0.1:{ports.api}"
        write_kubeconfig(kubeconfig, api, pki)
        write_kubeconfig(d / "operator.kubeconfig", api, pki, user="operator")
        c = cls(
            dir=d,
            bin_dir=bin_dir,
            kubeconfig=kubeconfig,
            api_port=ports.api,
            owns_dir=owns,
            net=net,
            prometheus_url=f"http://127.0.0.1:{prom_port}",
            keda_grpc_port=keda_grpc,
        )
        c.write_info()
        spawn = c.processes.spawn
        try:
            spawn("etcd", components.etcd(bin_dir, d / "etcd", ports))
            (d / "audit-policy.yaml").write_text(POLICY)
            spawn("kube-apiserver", components.kube_apiserver(bin_dir, d, pki, ports, r.service_range))
            c.processes.poll("kube-apiserver /readyz", lambda: c.kube.healthy("/readyz"), timeout)
            spawn(
                "kube-controller-manager",
                components.kube_controller_manager(bin_dir, kubeconfig, pki, ports, r.service_range),
            )
            spawn("kube-scheduler", components.kube_scheduler(bin_dir, kubeconfig, ports))
            stages = d / "kwok-stages.yaml"
            stages.write_text(components.kwok_stages(bin_dir))
            spawn("kwok", components.kwok(bin_dir, kubeconfig, stages, r.kwok_range, r.kwok_node_ip))
            for node in nodes(r.node_cidr):
                c.kube.create(node)
            c.kube.create(components.kubernetes_endpoints(r.node_ip))
            c._start_process_node(pki, host_paths, images, dns="coredns" in names)
            for name in addon_registry.DEFAULT:  # while the nodes come up
                addon_registry.ADDONS[name].start(c)
            c.wait_ready(timeout)
            for name in names:
                addon_registry.ADDONS[name].start(c)  # the named ones on a ready cluster (idempotent)
                addon_registry.ADDONS[name].wait(c, timeout)
                (d / "addons").mkdir(exist_ok=True)
                (d / "addons" / f"{name}.ready").write_text("")
            c.addons = names
            c.write_info()
            c.start_seconds = time.monotonic() - t0
        except BaseException:
            c.stop()
            raise
        return c

    def _start_process_node(
        self, pki: Path, host_paths: dict[str, str] | None, images: list[dict] | None, dns: bool
    ) -> None:
        from devcluster.addons import coredns, keda, prometheus

        assert self.net is not None
        r = self.net.ranges
        models = self.dir / "models"
        models.mkdir(exist_ok=True)
        cfg = {
            "kubeconfig_server": f"https://127.0.0.1:{self.api_port}",
            "ca": str(pki / "ca.crt"),
            "cert": str(pki / "admin.crt"),
            "key": str(pki / "admin.key"),
            "node": PROC_NODE,
            "slot": self.net.slot,
            "state_dir": str(self.dir / "procnode"),
            "api_port": self.api_port,
            "forwards": [
                [keda.GRPC_PORT, self.keda_grpc_port],
                [prometheus.PORT, int(self.prometheus_url.rsplit(":", 1)[1]), "node"],
            ],
            "images": [*(images or []), *default_images()],
            "host_paths": host_paths or {"/models": str(models)},
            "cluster_domain": coredns.DOMAIN,
            "dns_ip": coredns.dns_ip(r.service_range) if dns else "",
        }
        (self.dir / "procnode.json").write_text(json.dumps(cfg, indent=1))
        self.processes.spawn(
            "procnode", [sys.executable, "-m", "devcluster.node", str(self.dir / "procnode.json")], cwd=REPO
        )
        write_kubeconfig(self.node_kubeconfig, f"https://127.0.0.1:{NODE_API_PORT}", pki)
        self.processes.spawn(
            "kube-proxy",
            components.kube_proxy(self.bin_dir, self.net.node_ns, self.node_kubeconfig, PROC_NODE, r.pod_range),
        )

    def wait_ready(self, timeout: float) -> None:
        """The default ServiceAccount exists (the controller-manager works) and every node is Ready."""
        kube = self.kube
        self.processes.poll(
            "the default ServiceAccount",
            lambda: kube.exists("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout,
        )

        def nodes_ready() -> bool:
            items = kube.get("/api/v1/nodes", timeout=10)["items"]
            ready = [
                c["status"] == "True"
                for n in items
                for c in n.get("status", {}).get("conditions", [])
                if c["type"] == "Ready"
            ]
            return len(ready) == NODE_COUNT and all(ready)

        self.processes.poll("nodes Ready (kwok and proc-0)", nodes_ready, timeout)

    def stop(self) -> None:
        """Stop every process (reverse start order), then remove the temp dir if we made it."""
        self.processes.stop()
        if self.net is not None:
            self.net.teardown()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
