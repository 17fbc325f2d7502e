"""Which errno does a connect through the process node's network get, while pods come and go?

A standalone reproducer of issue 18's ``ENETUNREACH`` (root, no cluster needed, ~20 s): it builds the
process node's network exactly as the local cluster does (``devcluster.network.Network``: the node
namespace, br0, the root link, the routes), adds pods with ``Network.add_pod``/``remove_pod`` (the calls
the node agent makes), runs a TCP server in each pod, and loads into the node namespace the ruleset
kube-proxy's nftables mode writes (same chains, hooks, priorities, maps and verdicts as
k8s.io/kubernetes pkg/proxy/nftables/proxier.go):

- ``stable``: a ClusterIP whose two endpoints never change (pods 0 and 1);
- ``churn``: a ClusterIP whose only endpoint is a pod that is drained, deleted and re-created over
  and over, as kube-proxy sees it: endpoint removed → service in ``no-endpoint-services`` → pod
  deleted → new pod → endpoint back (each step one atomic ``nft -f`` transaction, as kube-proxy's);
- ``none``: a ClusterIP without endpoints (kube-proxy's ``no-endpoint-services`` → ``reject``);
- ``pod0``: pod 0's IP, directly.

Clients connect to each in a tight loop from the root namespace (where the tests' load generator
runs) and from a pod, and count the outcome of every connect. ``--no-fix`` removes the node
namespace's route for the service range first (the network as it was before the fix), so one checkout
shows both::

    sudo python3 bench/repro_enetunreach.py --no-fix    # before: ENETUNREACH for a Service without endpoints
    sudo python3 bench/repro_enetunreach.py             # after: ECONNREFUSED (kube-proxy's reject)

The kernel rate-limits ICMP errors per client address (a small burst, then about one a second; the
clients of 'none' and 'churn' share it), so most connects in a no-endpoints window get no answer and
time out (their SYN is retransmitted): the first ones show the errno. 'stable' and 'pod0' never fail
while pods come and go: creating and deleting veths, the bridge's ports and routes is not the cause.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcluster.network import Network, sh  # noqa: E402

PORT = 8000
SERVER = ("import socket\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          f"s.bind(('0.0.0.0', {PORT})); s.listen(4096)\n"
          "while True:\n    s.accept()[0].close()\n")


def ruleset(svc: dict[str, str], endpoints: dict[str, list[str]]) -> str:
    """kube-proxy's nftables layout (the parts a ClusterIP uses), for ``svc`` name → ClusterIP."""
    t = "ip kube-proxy"
    lines = [
        f"table {t}", f"delete table {t}", f"table {t}",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
        f"add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
        f"add set {t} cluster-ips {{ type ipv4_addr; }}",
        f"add chain {t} reject-chain", f"add rule {t} reject-chain reject",
        f"add chain {t} service-endpoints-check",
        f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"add chain {t} cluster-ips-check", f"add rule {t} cluster-ips-check ip daddr @cluster-ips reject",
        f"add chain {t} services",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
    ]
    for name, kind, hook, prio in (("filter-forward", "filter", "forward", "filter"),
                                   ("filter-output", "filter", "output", "filter"),
                                   ("nat-prerouting", "nat", "prerouting", "dstnat"),
                                   ("nat-output", "nat", "output", "-100")):
        lines.append(f"add chain {t} {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}")
        if kind == "filter":
            lines.append(f"add rule {t} {name} ct state new jump service-endpoints-check")
            lines.append(f"add rule {t} {name} ct state new jump cluster-ips-check")
        else:
            lines.append(f"add rule {t} {name} jump services")
    return "\n".join(lines + service_rules(svc, endpoints)) + "\n"


def service_rules(svc: dict[str, str], endpoints: dict[str, list[str]]) -> list[str]:
    """One atomic update of every service's chain and map entries (what a kube-proxy sync writes)."""
    out = ["flush map ip kube-proxy service-ips", "flush map ip kube-proxy no-endpoint-services"]
    for name, ip in svc.items():
        eps = endpoints.get(name, [])
        out.append(f"add element ip kube-proxy cluster-ips {{ {ip} }}")
        out.append(f"add chain ip kube-proxy svc-{name}")
        out.append(f"flush chain ip kube-proxy svc-{name}")
        if eps:
            vmap = ", ".join(f"{i} : goto ep-{name}-{i}" for i in range(len(eps)))
            for i, ep in enumerate(eps):
                out.append(f"add chain ip kube-proxy ep-{name}-{i}")
                out.append(f"flush chain ip kube-proxy ep-{name}-{i}")
                out.append(f"add rule ip kube-proxy ep-{name}-{i} meta l4proto tcp dnat to {ep}:{PORT}")
            out.append(f"add rule ip kube-proxy svc-{name} numgen random mod {len(eps)} vmap {{ {vmap} }}")
            out.append(f"add element ip kube-proxy service-ips {{ {ip} . tcp . {PORT} : goto svc-{name} }}")
        else:
            out.append(f"add element ip kube-proxy no-endpoint-services {{ {ip} . tcp . {PORT} : goto reject-chain }}")
    return out


def nft(net: Network, text: str) -> None:
    sh("nft", "-f", "-", netns=net.node_ns, input=text)


class Pods:
    """Pods with a TCP server each, made and removed with the node agent's own calls."""

    def __init__(self, net: Network) -> None:
        self.net, self.servers = net, {}

    def add(self, i: int) -> str:
        ns, ip = self.net.add_pod(i)
        self.servers[i] = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER])
        deadline = time.monotonic() + 10
        while sh("ss", "-Hltn", f"sport = :{PORT}", netns=ns).stdout.strip() == "":
            if time.monotonic() > deadline:
                raise RuntimeError(f"pod {i}: server not listening")
            time.sleep(0.01)
        return ip

    def remove(self, i: int) -> None:
        proc = self.servers.pop(i, None)
        if proc:
            proc.kill()
            proc.wait()
        self.net.remove_pod(i)


def in_netns(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (sockets it opens stay there)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def connect(ip: str) -> str:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((ip, PORT))
        return "ok"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", type=int, default=2, help="client threads per source (root, pod)")
    ap.add_argument("--no-fix", action="store_true",
                    help="delete the node namespace's service-range route (the network before the fix)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2

    net = Network.create(owner_pid=os.getpid())
    pods = Pods(net)
    counts: Counter[tuple[str, str, str]] = Counter()
    lock, stop = threading.Lock(), threading.Event()
    try:
        r = net.ranges
        base = r.service_range.split("/")[0].rsplit(".", 2)[0]
        svc = {"stable": f"{base}.0.10", "churn": f"{base}.0.11", "none": f"{base}.0.12"}
        if args.no_fix:
            sh("ip", "route", "del", r.service_range, netns=net.node_ns)
        routes = sh("ip", "route", netns=net.node_ns).stdout.strip().replace("\n", "; ")
        print(f"slot {net.slot}; node namespace routes: {routes}")
        stable_ips = [pods.add(0), pods.add(1)]
        pod0 = stable_ips[0]
        client_ns, _ = net.add_pod(9)
        endpoints = {"stable": stable_ips, "churn": [pods.add(2)]}
        nft(net, ruleset(svc, endpoints))
        targets = {**svc, "pod0": pod0}

        def client(where: str, name: str) -> None:
            if where != "root":
                in_netns(client_ns)
            while not stop.is_set():
                outcome = connect(targets[name])
                with lock:
                    counts[(where, name, outcome)] += 1

        threads = [threading.Thread(target=client, args=(w, name), daemon=True)
                   for w in ("root", "pod") for name in targets for _ in range(args.clients)]
        for t in threads:
            t.start()
        cycles, deadline = 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            # Drain (kube-proxy drops the endpoint: no endpoints), delete, re-create, endpoint back.
            nft(net, "\n".join(service_rules(svc, {**endpoints, "churn": []})) + "\n")
            time.sleep(0.2)
            pods.remove(2)
            new_ip = pods.add(2)
            time.sleep(0.1)
            endpoints["churn"] = [new_ip]
            nft(net, "\n".join(service_rules(svc, endpoints)) + "\n")
            time.sleep(0.2)
            cycles += 1
        stop.set()
        for t in threads:
            t.join(timeout=5)
    finally:
        for i in list(pods.servers):
            pods.remove(i)
        net.remove_pod(9)
        net.teardown()

    print(f"{cycles} churn cycles in {args.seconds:.0f} s ({'without' if args.no_fix else 'with'} the fix)")
    outcomes = sorted({o for _, _, o in counts})
    print(f"{'from':6} {'to':8}" + "".join(f"{o:>14}" for o in outcomes))
    for where in ("root", "pod"):
        for name in targets:
            print(f"{where:6} {name:8}" + "".join(f"{counts[(where, name, o)]:>14}" for o in outcomes))
    unreach = sum(n for (_, _, o), n in counts.items() if o == "ENETUNREACH")
    print(f"ENETUNREACH: {unreach} of {sum(counts.values())} connects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
