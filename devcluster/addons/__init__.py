"""Add-ons: what runs beside the control plane, started by name.

``make cluster-up ADDONS="keda"`` (``python -m devcluster up --addons keda``) starts the named ones with
the cluster; ``Cluster.start(addons=[...])`` does the same from Python and ``Cluster.start_addon(name)``
adds one to a running cluster (tests' ``keda`` fixture). ``DEFAULT`` ones always start: cluster DNS
(``coredns``) and ``prometheus``. An add-on is a module with ``start(cluster)`` (idempotent: spawn its
processes, create its objects; what users need to know goes in ``cluster.exports``, printed as
``KEY=value`` lines by ``up`` and ``status``) and ``wait(cluster, timeout)`` (until it serves); a new one
(``gateway``) is a module here and a line in ``ADDONS``.
"""

from __future__ import annotations

from types import ModuleType

from devcluster.addons import coredns, gateway, hydra, keda, prometheus

ADDONS: dict[str, ModuleType] = {
    "coredns": coredns,
    "prometheus": prometheus,
    "keda": keda,
    "hydra": hydra,
    "gateway": gateway,
}
DEFAULT = ("coredns", "prometheus")


def resolve(names: list[str]) -> list[str]:
    """The add-ons to start: the defaults, then the named ones (in order, once); an unknown name is
    an error that lists the known ones."""
    unknown = [n for n in names if n not in ADDONS]
    if unknown:
        raise ValueError(f"unknown add-on(s) {', '.join(unknown)}; known: {', '.join(ADDONS)}")
    return list(dict.fromkeys([*DEFAULT, *names]))
