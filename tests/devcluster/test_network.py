"""The process node's network: nothing a pod sends leaves the machine; clusters side by side take
their own slots and a dead owner's set is swept."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from devcluster.network import Network, Ranges, cleanup_stale, sh
from tests.devcluster.podutil import pod, ready
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster


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
