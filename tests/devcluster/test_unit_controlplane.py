"""The control plane's pure parts and files: command lines, Node objects, certificates, kubeconfigs,
the package's API paths (no cluster; openssl runs for real)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from devcluster.controlplane import components
from devcluster.controlplane.kubeconfig import write_kubeconfig
from devcluster.controlplane.nodes import KWOK_NODES, PROC_NODE, nodes
from devcluster.controlplane.pki import make_pki
from devcluster.kube import collection_path
from devcluster.network import Ranges

PORTS = components.Ports(etcd=1, etcd_peer=2, api=3, controller_manager=4, scheduler=5)


def flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_apiserver_flags():
    f = flags(components.kube_apiserver(Path("/b"), Path("/d"), Path("/d/pki"), PORTS, "10.151.0.0/16"))
    assert f["secure-port"] == "3" and f["bind-address"] == "127.0.0.1"
    assert f["service-cluster-ip-range"] == "10.151.0.0/16"
    assert f["endpoint-reconciler-type"] == "none"  # the cluster writes the `kubernetes` EndpointSlice
    assert f["service-account-issuer"] == "https://kubernetes.default.svc.cluster.local"
    assert f["audit-log-path"] == "/d/audit.log"


def test_components_run_their_binaries_and_kube_proxy_runs_in_the_node_namespace():
    assert components.etcd(Path("/b"), Path("/d/etcd"), PORTS)[0] == "/b/etcd"
    assert flags(components.kube_scheduler(Path("/b"), Path("/k"), PORTS))["secure-port"] == "5"
    proxy = components.kube_proxy(Path("/b"), "agl3", Path("/k"), PROC_NODE, "10.103.0.0/16")
    assert proxy[:5] == ["ip", "netns", "exec", "agl3", "/b/kube-proxy"]
    assert flags(proxy)["proxy-mode"] == "nftables"
    kwok = flags(components.kwok(Path("/b"), Path("/k"), Path("/s"), "10.103.0.0/17", "10.103.0.1"))
    assert kwok["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"


def test_nodes_proc_0_is_not_kwoks_and_gpu_nodes_are_tainted():
    objs = {n["metadata"]["name"]: n for n in nodes("10.103.128.0/24")}
    assert list(objs) == [PROC_NODE, *(n[0] for n in KWOK_NODES)]
    proc = objs[PROC_NODE]
    assert proc["spec"]["podCIDR"] == "10.103.128.0/24"
    assert "kwok.x-k8s.io/node" not in proc["metadata"].get("annotations", {})
    gpu = objs["kwok-gpu-0"]
    assert gpu["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert gpu["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert objs["kwok-cpu-0"]["status"]["capacity"]["pods"] == "1280"


def test_apiserver_certificate_is_valid_for_the_kubernetes_service(tmp_path):
    r = Ranges(7)
    make_pki(tmp_path, [r.kubernetes_service_ip, r.node_ip], "autoglm-operator")
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.crt"), "-noout", "-ext", "subjectAltName"],
                          check=True, capture_output=True, text=True).stdout
    for name in ("IP Address:10.157.0.1", "IP Address:10.107.255.2", "IP Address:127.0.0.1",
                 "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"):
        assert name in text, text
    subject = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "operator.crt"), "-noout", "-subject"],
                             check=True, capture_output=True, text=True).stdout
    assert "O = system:masters" in subject and "CN = autoglm-operator" in subject
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_kubeconfig_names_the_server_and_the_users_certificate(tmp_path):
    write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", tmp_path, user="operator")
    kc = yaml.safe_load((tmp_path / "kc").read_text())
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert kc["users"][0]["user"]["client-certificate"] == str(tmp_path / "operator.crt")


def test_kubernetes_endpoints_point_at_the_node_forwarder():
    es = components.kubernetes_endpoints("10.103.255.2")
    assert es["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
    assert es["endpoints"][0]["addresses"] == ["10.103.255.2"] and es["ports"][0]["port"] == 6443
    assert collection_path(es) == "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    assert collection_path({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}) == "/api/v1/nodes"
