"""The package's one way to talk to the apiserver: a small blocking JSON client on the standard
library (``urllib`` + ``ssl``, client-certificate auth).

Why not the ``kubernetes`` client the operator uses: ``python3 -m devcluster up`` (``make
cluster-up``) and the process node run with the system Python, before and without the project's
virtual environment, and the node needs only GET/PATCH/POST/DELETE and a line-by-line watch. Manifests
written as YAML (CRDs from Go modules, add-on objects) are applied with the cluster's own ``kubectl``,
the tool a user has too; tests may still ask ``Cluster.api_client()`` for a ``kubernetes`` client.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

USER_AGENT = "devcluster"


# Collection names of the kinds the package creates (``Kube.create``).
PLURALS = {
    "Node": "nodes",
    "Namespace": "namespaces",
    "Service": "services",
    "Endpoints": "endpoints",
    "EndpointSlice": "endpointslices",
    "APIService": "apiservices",
    "ConfigMap": "configmaps",
    "GatewayClass": "gatewayclasses",
    "Gateway": "gateways",
}


def collection_path(obj: dict[str, Any]) -> str:
    """The REST path of ``obj``'s collection (``/api/v1/namespaces/ns/services``...)."""
    api = obj["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    ns = obj.get("metadata", {}).get("namespace")
    return f"{base}{f'/namespaces/{ns}' if ns else ''}/{PLURALS[obj['kind']]}"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Kube:
    """A blocking client for one apiserver (client-certificate auth)."""

    def __init__(self, server: str, ca: str, cert: str, key: str, user_agent: str = USER_AGENT) -> None:
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)
        self.user_agent = user_agent

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", timeout: float = 30
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json", "User-Agent": self.user_agent},
        )
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise KubeError(exc.code, exc.read().decode(errors="replace")[:500]) from None

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False if it exists already (the cluster's objects are made once)."""
        try:
            self.request("POST", collection_path(obj), obj)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def get(self, path: str, timeout: float = 30) -> Any:
        return self.request("GET", path, timeout=timeout)

    def healthy(self, path: str = "/readyz", timeout: float = 10) -> bool:
        """Whether a health endpoint (``/readyz``, ``/livez``: plain text) answers 200."""
        req = urllib.request.Request(self.server + path, headers={"User-Agent": self.user_agent})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                return resp.status == 200
        except OSError:  # HTTPError included: not ready yet
            return False

    def exists(self, path: str, timeout: float = 10) -> bool:
        """Whether GET ``path`` answers 200 (False for 404 and for an apiserver not up yet)."""
        try:
            self.get(path, timeout=timeout)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        except OSError:
            return False
        return True

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]:
        sep = "&" if "?" in path else "?"
        url = (
            f"{self.server}{path}{sep}watch=1&allowWatchBookmarks=true&timeoutSeconds=240"
            f"&resourceVersion={resource_version}"
        )
        req = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
        with urllib.request.urlopen(req, context=self.ctx, timeout=300) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
