"""The one module that talks to the Kubernetes API.

Raw JSON over the official ``kubernetes`` client's transport (config loading, TLS, auth), run in a
small thread pool so the event loop never blocks. Objects are plain camelCase dicts, as the API
returns them. Repeatable creates: 409 on create and 404 on delete/get are expected outcomes.
Every request is counted by verb and kind in ``Kube.writes`` / ``Kube.reads`` (tests, figures).

Client settings: one pooled connection per thread (one ``ApiClient`` for the process), a token
bucket in front of every request (``api_qps``/``api_burst``: settings.py says why 200/400), a
per-request timeout, 429 and ``Retry-After`` honoured (bounded), and a distinctive User-Agent
(``autoglm-operator/<version>``) so the audit log tells our requests from kopf's and kubectl's.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib.metadata
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from . import metrics
from .builders import MANAGER, selector_string
from .conditions import now_rfc3339
from .models import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

USER_AGENT = f"{MANAGER}/{importlib.metadata.version('autoglm')}"
# 429 / Retry-After (and 503 with Retry-After, the apiserver's "come back later"): at most this many
# retries of one request, each waiting what the server asked, capped.
MAX_RETRIES_AFTER = 5
MAX_RETRY_AFTER_SECONDS = 30.0

# kind → (group, version, plural): every kind the operator reads or writes (cache.py serves some from indexes).
RESOURCES: dict[str, tuple[str, str, str]] = {
    "AutoGLMDeployment": (GROUP, VERSION, PLURAL),
    "Deployment": ("apps", "v1", "deployments"),
    "Pod": ("", "v1", "pods"),
    "Service": ("", "v1", "services"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes"),
    "PersistentVolumeClaim": ("", "v1", "persistentvolumeclaims"),
    "Secret": ("", "v1", "secrets"),
    "Event": ("", "v1", "events"),
    "Lease": ("coordination.k8s.io", "v1", "leases"),
    "ServiceAccount": ("", "v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings"),
}


# A label selector: the apiserver's string form, or labels that must all be equal (the form the cache serves).
Selector = str | Mapping[str, str]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after  # seconds, from a Retry-After header


class TokenBucket:
    """Client-side rate limit: ``qps`` tokens a second, at most ``burst`` saved up; FIFO waiters."""

    def __init__(self, qps: float, burst: int, clock: Any = time.monotonic) -> None:
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
        self._last = now

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one waiter at a time keeps the order fair
            self._refill()
            if self._tokens < 1.0:
                await asyncio.sleep((1.0 - self._tokens) / self.qps)
                self._refill()
            self._tokens -= 1.0


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0  # an HTTP date: wait a little rather than parse it


class KubeAPI(Protocol):
    """What reconcile needs; ``Kube`` talks to a cluster, tests may pass an in-memory fake."""

    async def get(self, kind: str, namespace: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None: ...
    async def list(
        self, kind: str, namespace: str | None, label_selector: Selector | None = None
    ) -> list[dict[str, Any]]: ...
    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None: ...
    async def apply(self, kind: str, namespace: str, body: dict[str, Any], *, force: bool = True) -> dict[str, Any]: ...
    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool: ...
    async def patch_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any] | None: ...
    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None: ...


def _path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    group, version, plural = RESOURCES[kind]
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def _verb(method: str, path: str) -> str:
    """The Kubernetes verb of a request (a GET of a collection is a list)."""
    if method == "GET":
        parts = path.split("/")  # a collection: .../namespaces/<ns>/<plural> or a cluster-wide .../<plural>
        return "list" if "namespaces" not in parts or parts[-3] == "namespaces" else "get"
    return _VERBS.get(method, method.lower())


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _load_api_client(pool_size: int) -> Any:
    """In-cluster config, else $KUBECONFIG / ~/.kube/config; one pooled connection per thread (reused)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    api = client.ApiClient(cfg)
    api.user_agent = USER_AGENT
    return api


class Kube:
    """Async facade over the blocking client. One instance per operator process."""

    def __init__(
        self,
        api_client: Any | None = None,
        *,
        threads: int = 16,
        timeout: float = 30.0,
        qps: float = 100.0,
        burst: int = 200,
    ) -> None:
        self._api = api_client or _load_api_client(threads)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self._timeout = (min(10.0, timeout), timeout)  # (connect, read)
        self._limiter = TokenBucket(qps, burst)
        self.throttled = 0  # requests the apiserver answered 429 (then retried)
        self.writes: collections.Counter[str] = collections.Counter()
        self.reads: collections.Counter[str] = collections.Counter()
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            self._api.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass

    # ------------------------------------------------------------ transport

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(method, url, header_params=headers, body=body, _request_timeout=self._timeout)
        data = resp.read()
        if 200 <= resp.status < 300:
            return json.loads(data) if data else None
        message = ""
        try:
            message = json.loads(data).get("message", "")
        except Exception:  # noqa: BLE001 - non-JSON error body
            message = (data or b"")[:500].decode(errors="replace")
        retry_after = _retry_after(getattr(resp, "headers", None)) if resp.status in (429, 503) else None
        raise ApiError(resp.status, str(resp.reason), message, retry_after=retry_after)

    async def _request(self, method: str, path: str, kind: str, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        for attempt in range(MAX_RETRIES_AFTER + 1):
            await self._limiter.acquire()
            (self.reads if method == "GET" else self.writes)[f"{method} {kind}"] += 1
            code = "error"
            try:
                result = await loop.run_in_executor(self._executor, functools.partial(self._call, method, path, **kw))
                code = "2xx"
                return result
            except ApiError as exc:
                code = str(exc.status)
                throttled = exc.status == 429 or (exc.status == 503 and exc.retry_after is not None)
                if not throttled or attempt == MAX_RETRIES_AFTER:
                    raise
                self.throttled += 1
                delay = min(MAX_RETRY_AFTER_SECONDS, exc.retry_after if exc.retry_after is not None else 1.0)
                log.info("Throttled by the apiserver on %s %s, retrying in %.1fs.", method, kind, delay)
            finally:
                metrics.count_request(_verb(method, path), kind, code)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ verbs

    async def get(self, kind: str, namespace: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """The object, ``None`` when it does not exist (always read from the API: ``fresh`` is implied)."""
        try:
            return await self._request("GET", _path(kind, namespace, name), kind)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, kind: str, namespace: str | None, label_selector: Selector | None = None
    ) -> list[dict[str, Any]]:
        if isinstance(label_selector, Mapping):
            label_selector = selector_string(label_selector)
        query = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", _path(kind, namespace), kind, query=query)
        return list(result.get("items") or [])

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create; ``None`` when it already exists (409 is an expected outcome)."""
        try:
            return await self._request("POST", _path(kind, namespace), kind, body=body, query={"fieldManager": MANAGER})
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def replace(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request(
            "PUT", _path(kind, namespace, name), kind, body=body, query={"fieldManager": MANAGER}
        )

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """JSON merge patch; ``None`` when the object is gone."""
        try:
            return await self._request(
                "PATCH",
                _path(kind, namespace, name),
                kind,
                body=patch,
                content_type="application/merge-patch+json",
                query={"fieldManager": MANAGER},
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, kind: str, namespace: str, body: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply with our one field manager (creates or updates; fields we stop sending
        are removed; fields others set and we never send are kept). ``force`` takes over the fields
        we send from another manager: callers pass it only for objects they control."""
        name = body["metadata"]["name"]
        query = {"fieldManager": MANAGER}
        if force:
            query["force"] = "true"
        return await self._request(
            "PATCH",
            _path(kind, namespace, name),
            kind,
            body=body,
            content_type="application/apply-patch+yaml",
            query=query,
        )

    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete in the background; ``False`` when it was already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("DELETE", _path(kind, namespace, name), kind, body=body)
            return True
        except ApiError as exc:
            if exc.status in (404, 409):
                return False
            raise

    async def patch_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await self._request(
                "PATCH",
                _path("AutoGLMDeployment", namespace, name, "status"),
                "AutoGLMDeployment/status",
                body={"status": status_patch},
                content_type="application/merge-patch+json",
                query={"fieldManager": MANAGER},
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        stamp = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "reportingInstance": self._instance[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._request("POST", _path("Event", meta["namespace"]), "Event", body=body)
        except ApiError as exc:  # events are best effort
            log.warning("Failed to post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
