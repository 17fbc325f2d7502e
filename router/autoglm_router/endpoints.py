"""Where the router's pods come from: a ``Topology`` (stable and canary revisions, their Ready pods and
the canary's weight), behind the ``EndpointSource`` interface.

- ``StaticSource``: a fixed topology (``--backend``), for tests and for running outside a cluster.
- ``kube.KubeSource``: watches the revision Services' EndpointSlices and the AutoGLMDeployment's status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Endpoint:
    address: str  # host:port
    pod: str  # the pod's name (the address where none is known)


@dataclass(frozen=True)
class Revision:
    name: str
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Topology:
    stable: Revision | None = None
    canary: Revision | None = None
    canary_weight: int = 0  # percent of users on the canary
    synced: bool = True  # the source has read its first full state

    def revisions(self) -> list[Revision]:
        return [r for r in (self.stable, self.canary) if r is not None]

    def endpoints(self) -> list[Endpoint]:
        return [e for r in self.revisions() for e in r.endpoints]


class EndpointSource(Protocol):
    def topology(self) -> Topology: ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called after every change of the topology (held requests wake on it)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class StaticSource:
    """A fixed topology (the ``--backend`` flags); ``set`` replaces it (tests change it while serving)."""

    current: Topology = field(default_factory=Topology)
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def topology(self) -> Topology:
        return self.current

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    def set(self, topology: Topology) -> None:
        self.current = topology
        for callback in self.listeners:
            callback()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def parse_backends(specs: Iterable[str], canary_revision: str | None, canary_weight: int) -> Topology:
    """``REVISION=[POD@]HOST:PORT`` flags → a topology; the revision named ``canary_revision`` is the
    canary, the other one the stable (at most two revisions)."""
    by_rev: dict[str, list[Endpoint]] = {}
    for spec in specs:
        rev, sep, target = spec.partition("=")
        if not sep or not rev or not target:
            raise ValueError(f"--backend must be REVISION=[POD@]HOST:PORT, got {spec!r}")
        pod, _, address = target.rpartition("@")
        address = address.removeprefix("http://")
        by_rev.setdefault(rev, []).append(Endpoint(address, pod or address))
    stable_names = [r for r in by_rev if r != canary_revision]
    if len(stable_names) > 1:
        raise ValueError(f"at most one stable revision, got {stable_names}")
    if canary_revision is not None and canary_revision not in by_rev:
        raise ValueError(f"--canary-revision {canary_revision!r} has no --backend")
    stable = Revision(stable_names[0], tuple(by_rev[stable_names[0]])) if stable_names else None
    canary = Revision(canary_revision, tuple(by_rev[canary_revision])) if canary_revision else None
    return Topology(stable, canary, canary_weight if canary else 0)


def ready_endpoints(endpoint_slice: Mapping[str, Any]) -> list[Endpoint]:
    """The Ready endpoints of one EndpointSlice (``conditions.ready`` not false, which the API defines as
    ready; serving-but-terminating pods are left out: a pod leaving is dropped at once)."""
    ports = [p.get("port") for p in endpoint_slice.get("ports") or [] if p.get("name") in (None, "", "http")]
    port = next((p for p in ports if p), None)
    if port is None:
        return []
    found = []
    for ep in endpoint_slice.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        pod = (ep.get("targetRef") or {}).get("name")
        for address in ep.get("addresses") or []:
            found.append(Endpoint(f"{address}:{port}", pod or address))
    return found
