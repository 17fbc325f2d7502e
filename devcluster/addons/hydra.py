"""ORY Hydra v2.3.0 (``gobuild/components/hydra.sh``): a real OAuth2 / OpenID Connect server for the
router's bearer tokens. In-memory storage (``DSN=memory``: every start is a fresh server with new
keys and no clients), JWT access tokens signed RS256 (``STRATEGIES_ACCESS_TOKEN=jwt``), plain HTTP
(``--dev``), usage statistics off (``--sqa-opt-out``: nothing leaves this machine).

In the cluster it runs in the node's network namespace on the node's address, as CoreDNS does: the
host reaches that address over its link to the node, and pods route to it through the node's bridge,
so one issuer URL, ``http://<node IP>:4444/``, is the same for both (a token's ``iss`` must equal the
URL its verifier was given). ``make cluster-up ADDONS=hydra`` prints it as ``HYDRA_ISSUER`` and the
admin API (clients, keys) as ``HYDRA_ADMIN``; both also sit in ``cluster.json``'s ``exports``.
``Hydra.start()`` runs one on loopback without a cluster (tests that stop it or run two).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.processes import Processes, free_ports

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

PUBLIC_PORT = 4444  # the issuer: token endpoint, discovery document, JWKS
ADMIN_PORT = 4445  # clients, keys (no authentication: a development server)
ACCESS_TOKEN_KEYS = "hydra.jwt.access-token"  # the JWK set Hydra signs access tokens with


def urls(host: str, public_port: int = PUBLIC_PORT, admin_port: int = ADMIN_PORT) -> tuple[str, str]:
    """The issuer URL (with the trailing slash Hydra puts in ``iss``) and the admin API's base URL."""
    return f"http://{host}:{public_port}/", f"http://{host}:{admin_port}"


def env(host: str, public_port: int, admin_port: int, secret: str) -> dict[str, str]:
    """Hydra's settings (its environment-variable form of the configuration file)."""
    issuer, _ = urls(host, public_port, admin_port)
    return {
        "DSN": "memory",
        "URLS_SELF_ISSUER": issuer,
        "SECRETS_SYSTEM": secret,
        "STRATEGIES_ACCESS_TOKEN": "jwt",
        "SERVE_PUBLIC_HOST": host,
        "SERVE_PUBLIC_PORT": str(public_port),
        "SERVE_ADMIN_HOST": host,
        "SERVE_ADMIN_PORT": str(admin_port),
        "SQA_OPT_OUT": "true",
        "LOG_LEVEL": "info",
    }


def argv(bin_dir: Path, netns: str | None = None) -> list[str]:
    cmd = [str(bin_dir / "hydra"), "serve", "all", "--dev", "--sqa-opt-out"]
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def ready(issuer: str, admin: str) -> bool:
    """The admin API is ready and the issuer serves its discovery document with its own URL."""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"{admin}/health/ready", timeout=2) as resp:
            if resp.status != 200:
                return False
        with urllib.request.urlopen(f"{issuer}.well-known/openid-configuration", timeout=2) as resp:
            return json.load(resp).get("issuer") == issuer
    return False


def spawn(processes: Processes, bin_dir: Path, host: str, ports: tuple[int, int], netns: str | None) -> tuple[str, str]:
    """Start Hydra (process ``hydra`` of ``processes``) on ``host``; returns (issuer, admin)."""
    processes.spawn("hydra", argv(bin_dir, netns), env=env(host, *ports, secret=secrets.token_urlsafe(32)))
    return urls(host, *ports)


def start(c: Cluster) -> None:
    if "hydra" in c.processes.procs:
        return
    net = c.network
    issuer, admin = spawn(c.processes, c.bin_dir, net.ranges.node_ip, (PUBLIC_PORT, ADMIN_PORT), net.node_ns)
    c.exports.update({"HYDRA_ISSUER": issuer, "HYDRA_ADMIN": admin})


def wait(c: Cluster, timeout: float) -> None:
    issuer, admin = urls(c.network.ranges.node_ip)
    c.processes.poll(f"Hydra ready at {issuer}", lambda: ready(issuer, admin), timeout)


@dataclass
class Hydra:
    """A Hydra of its own on loopback (free ports), outside any cluster: ``Hydra.start(bin_dir, d)``,
    ``.stop()``. Its log is ``d/hydra.log``."""

    issuer: str
    admin: str
    processes: Processes

    @classmethod
    def start(cls, bin_dir: Path, workdir: Path, timeout: float = 30) -> Hydra:
        workdir.mkdir(parents=True, exist_ok=True)
        processes = Processes(workdir)
        public, admin_port = free_ports(2)
        issuer, admin = spawn(processes, bin_dir, "127.0.0.1", (public, admin_port), None)
        h = cls(issuer, admin, processes)
        try:
            processes.poll(f"Hydra ready at {issuer}", lambda: ready(issuer, admin), timeout)
        except BaseException:
            h.stop()
            raise
        return h

    def stop(self) -> None:
        self.processes.stop()


def admin_call(admin: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON call to Hydra's admin API (``POST /admin/clients``, ``POST /admin/keys/<set>``...)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None
