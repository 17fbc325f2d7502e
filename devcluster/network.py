"""The process node's network: network namespaces, veth pairs, a bridge, routes and nftables.

Layout for cluster slot ``N`` (1..50, one per running cluster on this machine, so two clusters side
by side never collide)::

    root namespace                      node namespace  agl<N>              pod namespaces agl<N>-p<i>
    agl<N>h 10.<100+N>.255.1/30  <veth>  eth0 10.<100+N>.255.2/30
                                         br0  10.<100+N>.128.1/24  <veth vp<i>>  eth0 10.<100+N>.128.<i+1>
                                         kube-proxy (nftables)

- Pod range of the cluster: ``10.<100+N>.0.0/16`` (kwok's fake pods take the lower /17, the process
  node ``proc-0`` owns ``10.<100+N>.128.0/24``); service range ``10.<150+N>.0.0/16``.
- The bridge and kube-proxy live in a per-cluster *node* namespace, not the root one: kube-proxy's
  nftables table name is fixed (``kube-proxy``), so two clusters sharing the root namespace would
  overwrite each other's rules, and IP forwarding is turned on only inside the node namespace
  (the root namespace's ``ip_forward`` is never touched).
- Nothing a pod sends may leave the machine: pods have routes for the cluster's pod and service
  ranges only (no default route); the node namespace has no default route and an nftables
  ``forward`` chain that drops everything except bridge <-> root-link traffic. It routes the service
  range to ``svc0`` (a veth pair with nothing behind it, never sent on) so that a packet kube-proxy
  did not DNAT reaches the forward hook, where kube-proxy rejects it (a Service without endpoints:
  ``ECONNREFUSED``) or drops it, as on a real node; without a route the node answered
  "network unreachable" (issue 18). The root namespace routes only the node's /24 and the service
  range into the node namespace and holds ``unreachable`` routes for the rest of the pod range, so a
  packet to an address nobody holds fails at once.

Everything is named after the slot; ``cleanup_stale()`` removes the set of a cluster whose owner
process died (``kill -9``), ``Network.teardown()`` the set of a cluster that stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MAX_SLOTS = 50
OWNERS = Path("/run/autoglm-cluster")  # slot -> owner pid, so a later start can clean up after kill -9


class NetworkError(RuntimeError):
    pass


def sh(
    *args: str, check: bool = True, netns: str | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class Ranges:
    slot: int

    @property
    def pod_range(self) -> str:  # the whole cluster's pods (kwok + process node)
        return f"10.{100 + self.slot}.0.0/16"

    @property
    def kwok_range(self) -> str:  # kwok's fake pod IPs (never routed anywhere)
        return f"10.{100 + self.slot}.0.0/17"

    @property
    def kwok_node_ip(self) -> str:  # the address kwok gives its fake nodes
        return f"10.{100 + self.slot}.0.1"

    @property
    def node_cidr(self) -> str:  # proc-0's spec.podCIDR
        return f"10.{100 + self.slot}.128.0/24"

    @property
    def service_range(self) -> str:
        return f"10.{150 + self.slot}.0.0/16"

    @property
    def kubernetes_service_ip(self) -> str:
        return f"10.{150 + self.slot}.0.1"

    @property
    def gateway(self) -> str:  # br0 in the node namespace
        return f"10.{100 + self.slot}.128.1"

    @property
    def host_ip(self) -> str:  # the root namespace's end of the link
        return f"10.{100 + self.slot}.255.1"

    @property
    def node_ip(self) -> str:  # the node namespace's end of the link (proc-0's InternalIP)
        return f"10.{100 + self.slot}.255.2"

    def pod_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.node_cidr)[index + 2])

    @property
    def max_pods(self) -> int:
        return ipaddress.ip_network(self.node_cidr).num_addresses - 3


@dataclass
class Network:
    slot: int

    @property
    def ranges(self) -> Ranges:
        return Ranges(self.slot)

    @property
    def node_ns(self) -> str:
        return f"agl{self.slot}"

    @property
    def host_link(self) -> str:
        return f"agl{self.slot}h"

    def pod_ns(self, index: int) -> str:
        return f"agl{self.slot}-p{index}"

    # ----- the node --------------------------------------------------------------------------
    @classmethod
    def create(cls, owner_pid: int) -> Network:
        """Claim a free slot (the node namespace's name is the lock) and build the node's network."""
        cleanup_stale()
        taken = set(_netns_names())
        for slot in range(1, MAX_SLOTS + 1):
            if f"agl{slot}" in taken:
                continue
            if sh("ip", "netns", "add", f"agl{slot}", check=False).returncode != 0:
                continue  # another cluster took it a moment ago
            net = cls(slot)
            OWNERS.mkdir(parents=True, exist_ok=True)
            (OWNERS / str(slot)).write_text(str(owner_pid))
            try:
                net._build()
            except BaseException:
                net.teardown()
                raise
            return net
        raise NetworkError(f"no free cluster slot (1..{MAX_SLOTS}); `ip netns list` shows them all taken")

    def _build(self) -> None:
        r, ns = self.ranges, self.node_ns
        sh("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{r.host_ip}/30", "dev", self.host_link)
        sh("ip", "link", "set", self.host_link, "up")
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{r.node_ip}/30", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "addr", "add", f"{r.gateway}/24", "dev", "br0"],
            ["ip", "link", "set", "br0", "up"],
            # A route for the service range, so kube-proxy's verdicts apply (module docstring).
            ["ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc0p"],
            ["ip", "link", "set", "svc0p", "up"],
            ["ip", "link", "set", "svc0", "up"],
            ["ip", "route", "add", r.service_range, "dev", "svc0"],
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ):
            sh(*cmd, netns=ns)
        # Only bridge <-> root-link traffic is forwarded inside the node namespace.
        sh(
            "nft",
            "-f",
            "-",
            netns=ns,
            input=(
                "table inet autoglm-node {\n"
                "  chain forward {\n"
                "    type filter hook forward priority 10; policy drop;\n"
                '    iifname { "br0", "eth0" } oifname { "br0", "eth0" } accept\n'
                "  }\n"
                "}\n"
            ),
        )
        # Root namespace: the node's /24 and the services go to the node namespace; the rest of the
        # pod range is unreachable (fails at once instead of leaving through the default route).
        sh("ip", "route", "replace", "unreachable", r.pod_range)
        sh("ip", "route", "replace", r.node_cidr, "via", r.node_ip, "dev", self.host_link)
        sh("ip", "route", "replace", r.service_range, "via", r.node_ip, "dev", self.host_link)

    def teardown(self) -> None:
        teardown_slot(self.slot)

    # ----- pods ------------------------------------------------------------------------------
    def add_pod(self, index: int) -> tuple[str, str]:
        """A network namespace with eth0 on the bridge; returns (namespace name, pod IP)."""
        r, ns, pod_ns = self.ranges, self.node_ns, self.pod_ns(index)
        ip = r.pod_ip(index)
        self.remove_pod(index)
        sh("ip", "netns", "add", pod_ns)
        host_end = f"vp{index}"
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod_ns, netns=ns)
        sh("ip", "link", "set", host_end, "master", "br0", "up", netns=ns)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", r.pod_range, "via", r.gateway],
            ["ip", "route", "add", r.service_range, "via", r.gateway],
        ):
            sh(*cmd, netns=pod_ns)
        return pod_ns, ip

    def remove_pod(self, index: int) -> None:
        sh("ip", "netns", "del", self.pod_ns(index), check=False)  # its veth goes with it
        sh("ip", "link", "del", f"vp{index}", check=False, netns=self.node_ns)


def teardown_slot(slot: int) -> None:
    """Remove every namespace, link, route and nftables rule of ``slot`` (idempotent)."""
    r = Ranges(slot)
    for name in _netns_names():
        if name.startswith(f"agl{slot}-p"):
            sh("ip", "netns", "del", name, check=False)
    sh("ip", "netns", "del", f"agl{slot}", check=False)  # takes the veth pair, its routes and nftables with it
    sh("ip", "link", "del", f"agl{slot}h", check=False)
    for route in (["unreachable", r.pod_range], [r.node_cidr], [r.service_range]):
        sh("ip", "route", "del", *route, check=False)
    with contextlib.suppress(FileNotFoundError):
        (OWNERS / str(slot)).unlink()


def cleanup_stale() -> list[int]:
    """Tear down the network of every slot whose owner process is gone (a ``kill -9`` of a test run)."""
    cleaned = []
    slots = {int(n[3:].split("-")[0]) for n in _netns_names() if n.startswith("agl") and n[3:].split("-")[0].isdigit()}
    if OWNERS.exists():
        slots |= {int(p.name) for p in OWNERS.iterdir() if p.name.isdigit()}
    for slot in sorted(slots):
        owner = OWNERS / str(slot)
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid):
            continue
        teardown_slot(slot)
        cleaned.append(slot)
    return cleaned
