"""Fixtures shared by every test tier.

`kube` starts one real cluster per test session (the `devcluster` package, docs/local-cluster.md). When it cannot
start, tests that need it fail with the reason; they are never skipped silently.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from devcluster import Cluster, build_binaries

REPO = Path(__file__).resolve().parents[1]

# kopf's KopfRunner turns the root logger to DEBUG; keep HTTP clients' connection chatter (printed
# at interpreter exit, after pytest's summary) out of the output.
for _noisy in ("httpcore", "httpcore2", "httpx", "openai", "asyncio"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def pytest_collection_modifyitems(config, items):
    # Tests that use the `kube` fixture are cluster tests even if a module forgot the marker,
    # so `-m "not cluster"` never starts a control plane.
    for item in items:
        if "kube" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kube(tmp_path_factory) -> Cluster:
    """A running local control plane for the whole session.

    Set AUTOGLM_TEST_KUBECONFIG to reuse one started by `make cluster-up` (faster local loops).
    """
    external = os.environ.get("AUTOGLM_TEST_KUBECONFIG")
    if external:
        yield Cluster.attach(Path(external), build_binaries())
        return
    c = Cluster.start(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(kube: Cluster, request) -> str:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def node_models(kube) -> Path:
    """The process node's /models (hostPath prefix mapped to a folder here) holding the embedded
    ``tiny`` model (what examples/tiny-cpu.yaml mounts) and ``broken`` (a model that cannot load)."""
    root = kube.models_dir
    if not (root / "tiny" / "config.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "autoglm-runtime"), "make-model", "--size", "tiny",
                        "--out", str(root / "tiny")], check=True, capture_output=True)
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "glm", "architectures": ["GlmForCausalLM"]}')
    return root


@pytest.fixture(scope="session")
def keda(kube) -> float:
    """KEDA installed in the session's cluster (only for the tests that need it); its start seconds."""
    return kube.start_addon("keda")


@pytest.fixture(scope="session")
def hydra(kube) -> dict[str, str]:
    """The ``hydra`` add-on in the session's cluster (ORY Hydra: an OAuth2 issuer at the node's address);
    its ``HYDRA_ISSUER`` / ``HYDRA_ADMIN`` URLs."""
    kube.start_addon("hydra")
    return {"issuer": kube.exports["HYDRA_ISSUER"], "admin": kube.exports["HYDRA_ADMIN"]}


@pytest.fixture(scope="session")
def gateway(kube) -> float:
    """The ``gateway`` add-on (Traefik, Gateway ``gateway/traefik``) in the session's cluster, only for
    the tests that need it; its start seconds."""
    return kube.start_addon("gateway")
