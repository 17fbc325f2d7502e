"""devcluster: a real single-node Kubernetes cluster on this machine, without Docker, for tests, the
demo and benchmarks. ``python -m devcluster up|down|status|logs``; from Python
``with Cluster.start() as c: ...``. Modules (one job each) are listed in docs/local-cluster.md.
"""

from devcluster.audit import OPERATOR_USER, WRITE_VERBS
from devcluster.binaries import ClusterError, build_binaries
from devcluster.cluster import Cluster
from devcluster.controlplane.nodes import PROC_NODE
from devcluster.images import HOST_IMAGE, OPERATOR_IMAGE, RUNTIME_IMAGE
from devcluster.processes import peak_rss_mib

__all__ = [
    "HOST_IMAGE",
    "OPERATOR_IMAGE",
    "OPERATOR_USER",
    "PROC_NODE",
    "RUNTIME_IMAGE",
    "WRITE_VERBS",
    "Cluster",
    "ClusterError",
    "build_binaries",
    "peak_rss_mib",
]
