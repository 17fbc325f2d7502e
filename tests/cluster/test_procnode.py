"""The process node: pods bound to proc-0 really run (network, volumes, env, probes, restarts,
deletion), Services reach them through kube-proxy, and nothing a pod sends leaves the machine."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.cluster.harness import HOST_IMAGE
from tests.cluster.network import Network, Ranges, cleanup_stale, sh
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

# A small HTTP server that reports what the container sees: uid, env, files under /etc/demo.
SERVER = r"""
import http.server, json, os, pathlib, signal, sys, time
seen = {"uid": os.getuid(), "gid": os.getgid(), "env": {k: v for k, v in os.environ.items() if k.startswith("DEMO_")},
        "files": {str(p): p.read_text() for p in pathlib.Path("/etc/demo").rglob("*") if p.is_file()},
        "scratch_writable": os.access("/scratch", os.W_OK), "root_writable": os.access("/", os.W_OK)}
print("seen", json.dumps(seen), flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(seen).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
def term(*_):
    print("got SIGTERM", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, term)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def pod(name: str, command: list[str], **extra) -> dict:
    container = {"name": "main", "image": f"{HOST_IMAGE}:1", "command": command,
                 "ports": [{"name": "http", "containerPort": 8080}], **extra.pop("container", {})}
    spec = {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 10, "containers": [container],
            **extra}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def get_pod(kube, namespace: str, name: str) -> dict | None:
    proc = kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def container_status(kube, namespace: str, name: str) -> dict:
    p = get_pod(kube, namespace, name) or {}
    return ((p.get("status") or {}).get("containerStatuses") or [{}])[0]


def ready(kube, namespace: str, name: str) -> dict | None:
    p = get_pod(kube, namespace, name)
    conds = {c["type"]: c["status"] for c in (p or {}).get("status", {}).get("conditions", [])}
    return p if conds.get("Ready") == "True" else None


def http_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def test_pod_runs_with_env_volumes_user_and_is_reached_through_its_service(kube, namespace):
    kube.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cret")
    kube.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=mode=fast",
                 "--from-literal=conf.ini=[x]\ny=1")
    body = pod("web", ["python3", "-c", SERVER],
               securityContext={"runAsUser": 1000, "runAsGroup": 1000},
               volumes=[{"name": "cfg", "configMap": {"name": "settings"}},
                        {"name": "sec", "secret": {"secretName": "creds"}},
                        {"name": "scratch", "emptyDir": {}}],
               container={
                   "env": [{"name": "DEMO_PLAIN", "value": "v1"},
                           {"name": "DEMO_EXPANDED", "value": "$(DEMO_PLAIN)-x"},
                           {"name": "DEMO_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                           {"name": "DEMO_MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                           {"name": "DEMO_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                   "volumeMounts": [{"name": "cfg", "mountPath": "/etc/demo/cfg", "readOnly": True},
                                    {"name": "sec", "mountPath": "/etc/demo/sec", "readOnly": True},
                                    {"name": "scratch", "mountPath": "/scratch"}],
                   "securityContext": {"readOnlyRootFilesystem": True},
                   "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    p = wait_for(lambda: ready(kube, namespace, "web"), timeout=60, message="pod web Ready")
    assert p["spec"]["nodeName"] == "proc-0"
    ip = p["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(kube.net.ranges.node_cidr)
    seen = http_json(f"http://{ip}:8080/")
    assert seen["uid"] == 1000 and seen["gid"] == 1000
    assert seen["env"] == {"DEMO_PLAIN": "v1", "DEMO_EXPANDED": "v1-x", "DEMO_TOKEN": "s3cret", "DEMO_MODE": "fast",
                           "DEMO_POD": "web"}
    assert seen["files"] == {"/etc/demo/cfg/mode": "fast", "/etc/demo/cfg/conf.ini": "[x]\ny=1",
                             "/etc/demo/sec/token": "s3cret"}
    assert seen["scratch_writable"] and not seen["root_writable"]
    assert '"DEMO_TOKEN": "s3cret"' in kube.pod_log(namespace, "web", "main")  # logs land in a file per container

    # A ClusterIP Service reaches it from the root namespace, through kube-proxy's nftables rules.
    kube.kubectl("expose", "pod", "web", "-n", namespace, "--port=80", "--target-port=8080")
    svc = json.loads(kube.kubectl("get", "svc", "web", "-n", namespace, "-o", "json").stdout)
    cluster_ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(kube.net.ranges.service_range)
    assert wait_for(lambda: http_json(f"http://{cluster_ip}:80/", timeout=2), timeout=30,
                    message="the Service answers")["env"]["DEMO_POD"] == "web"

    # Deletion: SIGTERM reaches the process, the pod is gone well within its grace period.
    t0 = time.monotonic()
    kube.kubectl("delete", "pod", "web", "-n", namespace, "--wait=false")
    wait_for(lambda: get_pod(kube, namespace, "web") is None, timeout=30, message="pod web deleted")
    assert time.monotonic() - t0 < 10
    assert "got SIGTERM" in kube.pod_log(namespace, "web", "main")
    assert kube.net.pod_ns(int(ip.split(".")[-1]) - 2) not in sh("ip", "netns", "list").stdout.split()


def test_unknown_image_is_err_image_pull(kube, namespace):
    body = pod("ghost", ["true"])
    body["spec"]["containers"][0]["image"] = "registry.invalid/nothing:1"
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    waiting = wait_for(lambda: container_status(kube, namespace, "ghost").get("state", {}).get("waiting"),
                       timeout=30, message="ghost waiting")
    assert waiting["reason"] == "ErrImagePull"
    assert "registry.invalid/nothing:1" in waiting["message"]


def test_crash_restarts_with_backoff_and_reports_the_log_tail(kube, namespace):
    body = pod("crash", ["sh", "-c", "echo starting; echo 'fatal: no model here' >&2; exit 3"],
               container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    cs = wait_for(lambda: (lambda s: s if s.get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
                           else None)(container_status(kube, namespace, "crash")), timeout=30, message="back-off")
    last = cs["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error"
    assert last["message"].splitlines()[-1] == "fatal: no model here"
    assert "back-off 10s" in cs["state"]["waiting"]["message"]
    cs = wait_for(lambda: (lambda s: s if s.get("restartCount", 0) >= 1 else None)(
        container_status(kube, namespace, "crash")), timeout=40, message="one restart")
    # Caught running again, just exited, or waiting out the doubled back-off.
    state = cs["state"]
    assert state.get("running") or state.get("terminated") or "back-off 20s" in state["waiting"]["message"], state


def test_liveness_failure_restarts_and_startup_probe_gates_started(kube, namespace):
    # exec probes run inside the container: /tmp/alive exists for ~3 s after start, then liveness fails.
    script = "touch /tmp/alive; (sleep 3; rm /tmp/alive) & exec sleep 300"
    body = pod("live", ["sh", "-c", script], container={
        "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1},
        "livenessProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1, "failureThreshold": 2}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    wait_for(lambda: container_status(kube, namespace, "live").get("started"), timeout=30, message="started")
    cs = wait_for(lambda: (lambda s: s if s.get("restartCount", 0) >= 1 else None)(
        container_status(kube, namespace, "live")), timeout=60, message="liveness restart")
    assert cs["lastState"]["terminated"]["exitCode"] != 0


def test_tcp_readiness_gates_endpoints(kube, namespace):
    # Ready only once something listens on 8080 (after 2 s): the pod's Ready condition follows.
    body = pod("late", ["sh", "-c", "sleep 2; exec python3 -m http.server 8080"], container={
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    running = wait_for(lambda: container_status(kube, namespace, "late").get("state", {}).get("running"),
                       timeout=30, message="running")
    assert running and not ready(kube, namespace, "late")
    p = wait_for(lambda: ready(kube, namespace, "late"), timeout=30, message="ready")
    with socket.create_connection((p["status"]["podIP"], 8080), timeout=2):
        pass


# ------------------------------------------------------------------ nothing leaves this machine


def _connect_error(host: str, port: int = 80, netns: str | None = None, timeout: float = 5) -> str:
    code = (f"import socket,time\nt=time.monotonic()\ns=socket.socket()\ns.settimeout({timeout})\n"
            f"try:\n  s.connect(({host!r},{port})); print('connected')\n"
            f"except OSError as e: print(type(e).__name__, e.errno, round(time.monotonic()-t,2))")
    cmd = ["python3", "-c", code]
    out = subprocess.run(["ip", "netns", "exec", netns, *cmd] if netns else cmd, capture_output=True, text=True)
    return out.stdout.strip()


def test_nothing_a_pod_sends_leaves_the_machine(kube, namespace):
    body = pod("probe", ["sleep", "300"])
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    p = wait_for(lambda: ready(kube, namespace, "probe"), timeout=30, message="probe Ready")
    r: Ranges = kube.net.ranges
    index = int(p["status"]["podIP"].split(".")[-1]) - 2
    ns = kube.net.pod_ns(index)
    assert p["status"]["podIP"] in sh("ip", "-4", "addr", "show", "eth0", netns=ns).stdout

    # Routes in the pod: its own subnet, the pod range and the service range; no default route.
    routes = sh("ip", "route", netns=ns).stdout
    assert "default" not in routes
    assert r.pod_range in routes and r.service_range in routes
    # An outside address fails at once with "network unreachable" (errno 101), in the pod and in the node.
    for netns in (ns, kube.net.node_ns):
        err = _connect_error("203.0.113.10", netns=netns)
        assert err.startswith("OSError 101") or err.startswith("OSError 113"), err
        assert float(err.split()[-1]) < 1.0, err
    # The root namespace: forwarding stays off; pod-range addresses nobody holds are unreachable at once.
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "0"
    assert f"unreachable {r.pod_range}" in sh("ip", "route").stdout
    assert "No route to host" in sh("ip", "route", "get", f"10.{100 + kube.net.slot}.7.7", check=False).stderr
    err = _connect_error(f"10.{100 + kube.net.slot}.7.7")
    assert err.startswith("OSError 113") or err.startswith("OSError 101"), err
    assert float(err.split()[-1]) < 1.0, err
    # The node namespace forwards only bridge <-> root link.
    rules = sh("nft", "list", "table", "inet", "autoglm-node", netns=kube.net.node_ns).stdout
    assert "policy drop" in rules and 'iifname { "br0", "eth0" } oifname { "br0", "eth0" } accept' in rules


def test_a_service_without_endpoints_is_refused_as_on_a_real_node(kube, namespace):
    # kube-proxy rejects a connect to a Service without endpoints in the node's *forward* hook; the node
    # namespace must route the service range for a packet to get there. Without that route the node
    # answered ICMP net-unreachable (errno 101, ENETUNREACH) instead: issue 18's flake.
    kube.kubectl("create", "service", "clusterip", "empty", "--tcp=8000:8000", "-n", namespace)
    ip = kube.kubectl("get", "service", "empty", "-n", namespace, "-o", "jsonpath={.spec.clusterIP}").stdout
    wait_for(lambda: ip in sh("nft", "list", "map", "ip", "kube-proxy", "no-endpoint-services",
                              netns=kube.net.node_ns).stdout, timeout=30, message="kube-proxy's no-endpoints rule")
    # The kernel rate-limits ICMP errors per client (one a second after a burst), so a connect may
    # first lose its SYN and get the answer on a retransmission: a generous timeout.
    err = _connect_error(ip, 8000, timeout=10)
    assert err.startswith("ConnectionRefusedError 111"), err


def test_a_second_network_takes_another_slot_and_stale_sets_are_removed(kube):
    child = subprocess.Popen(["sleep", "60"])
    try:
        other = Network.create(owner_pid=child.pid)
    finally:
        child.kill()
        child.wait()
    try:
        assert other.slot != kube.net.slot
        other.add_pod(0)
        names = sh("ip", "netns", "list").stdout
        assert other.node_ns in names and other.pod_ns(0) in names
        # Its owner is dead now (as after kill -9): the next start's sweep removes all of it.
        assert other.slot in cleanup_stale()
        names = sh("ip", "netns", "list").stdout.split()
        assert other.node_ns not in names and other.pod_ns(0) not in names
        assert f"agl{other.slot}h" not in sh("ip", "link").stdout
        assert other.ranges.service_range not in sh("ip", "route").stdout
        # The running cluster's own set is left alone (its owner, this test process, is alive).
        assert kube.net.node_ns in names and kube.net.slot not in cleanup_stale()
    finally:
        other.teardown()
