"""Add-ons: what runs beside the control plane, started by name.

``make cluster-up ADDONS="keda"`` (``python -m devcluster up --addons keda``) starts the named ones with
the cluster; ``Cluster.start(addons=[...])`` does the same from Python and ``Cluster.start_addon(name)``
adds one to a running cluster (tests' ``keda`` fixture). ``DEFAULT`` ones always start: cluster DNS
(``coredns``) and ``prometheus``. An add-on is a module with ``start(cluster)`` (idempotent: spawn its
processes, create its objects) and ``wait(cluster, timeout)`` (until it serves), and may have
``exports(info)``: ``NAME=value`` lines that ``up``/``status`` print for it (``info``: the cluster's
``cluster.json``); a new one (``hydra``) is a module here and a line in ``ADDONS``.
"""

from __future__ import annotations

from types import ModuleType

from devcluster.addons import coredns, gateway, keda, prometheus

ADDONS: dict[str, ModuleType] = {"coredns": coredns, "prometheus": prometheus, "keda": keda, "gateway": gateway}
DEFAULT = ("coredns", "prometheus")


def resolve(names: list[str]) -> list[str]:
    """The add-ons to start: the defaults, then the named ones (in order, once); an unknown name is
    an error that lists the known ones."""
    unknown = [n for n in names if n not in ADDONS]
    if unknown:
        raise ValueError(f"unknown add-on(s) {', '.join(unknown)}; known: {', '.join(ADDONS)}")
    return list(dict.fromkeys([*DEFAULT, *names]))


def exports(info: dict) -> list[str]:
    """The ``NAME=value`` lines of the running add-ons (``GATEWAY_ADDRESS=...``), in start order."""
    running = [ADDONS[n] for n in info.get("addons") or [] if n in ADDONS]
    return [line for module in running if hasattr(module, "exports") for line in module.exports(info)]
