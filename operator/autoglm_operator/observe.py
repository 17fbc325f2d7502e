"""What is there: one AutoGLMDeployment's children and references, read and summarised.

``observe()`` reads the revisions (Deployments), their pods, the other children and the PVC/Secrets
the spec references; the pure functions below turn what it read into ``Problem``s (why it is not
working) and the autoscaler's part of the status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

from . import builders as b
from . import router_builders as rb
from .conditions import DEGRADED, get_condition
from .kube import KubeAPI
from .models import ResolvedSpec

BAD_WAITING = {
    "CrashLoopBackOff": "CrashLoopBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "ErrImagePull": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
}


@dataclasses.dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Revision:
    """One revision as its Deployment shows it."""

    hash: str
    name: str
    version: str
    desired: int  # spec.replicas (ours, or the HPA's choice)
    replicas: int  # status.replicas
    ready: int  # status.readyReplicas
    updated: int  # status.updatedReplicas
    current: bool  # status describes the current generation
    created: str
    uid: str
    spec_hash: str
    deadline_exceeded: str = ""  # message of Progressing=False/ProgressDeadlineExceeded
    replica_failure: str = ""  # message of ReplicaFailure=True (pods refused: admission, quota)
    replicas_managed_elsewhere: bool = False  # another field manager (an HPA, kubectl scale) set spec.replicas
    pods: int = 0  # its pods now, terminating ones included (what occupies GPUs)

    @property
    def is_ready(self) -> bool:
        return self.current and self.ready >= self.desired and self.updated >= self.desired

    @classmethod
    def from_deployment(cls, d: dict[str, Any]) -> Revision:
        meta, spec, st = d["metadata"], d.get("spec") or {}, d.get("status") or {}
        labels = meta.get("labels") or {}
        progressing = get_condition(st.get("conditions"), "Progressing") or {}
        deadline = ""
        if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
            deadline = progressing.get("message") or "progress deadline exceeded"
        replica_failure = get_condition(st.get("conditions"), "ReplicaFailure") or {}
        failure = ""
        if replica_failure.get("status") == "True":
            failure = replica_failure.get("message") or replica_failure.get("reason") or "pods cannot be created"
        return cls(
            hash=labels.get(b.LABEL_REVISION, ""),
            name=meta["name"],
            version=labels.get(b.LABEL_VERSION, ""),
            desired=int(spec.get("replicas", 1)),
            replicas=int(st.get("replicas") or 0),
            ready=int(st.get("readyReplicas") or 0),
            updated=int(st.get("updatedReplicas") or 0),
            current=int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0),
            created=meta.get("creationTimestamp") or "",
            uid=meta.get("uid") or "",
            spec_hash=(meta.get("annotations") or {}).get(b.ANNOTATION_SPEC_HASH, ""),
            deadline_exceeded=deadline,
            replica_failure=failure,
            replicas_managed_elsewhere=_replicas_managed_elsewhere(meta),
        )


def _replicas_managed_elsewhere(meta: dict[str, Any]) -> bool:
    """Whether a field manager other than our server-side apply owns ``spec.replicas`` (managedFields)."""
    for entry in meta.get("managedFields") or []:
        if entry.get("manager") == b.MANAGER and entry.get("operation") == "Apply":
            continue
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


@dataclasses.dataclass
class Observed:
    revisions: dict[str, Revision]
    pods: list[dict[str, Any]]
    service: dict[str, Any] | None
    hpa: dict[str, Any] | None
    pdb: dict[str, Any] | None
    preconditions: list[Problem]
    network_policy: dict[str, Any] | None = None
    scaled_object: dict[str, Any] | None = None
    keda_hpa: dict[str, Any] | None = None  # the HPA KEDA made for our ScaledObject
    # (kind, name, resourceVersion or "" when missing) of each Secret/PVC a precondition waits for
    waiting_for: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    draining: int = 0  # pods of revisions whose Deployments are gone (still terminating)
    route: dict[str, Any] | None = None  # the HTTPRoute (GatewayAPI routing)
    route_services: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    router_deployment: dict[str, Any] | None = None  # {name}-router (spec.router), ours
    router_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # read only with spec.auth.oauth2

    @property
    def router_ready(self) -> int:
        return int(((self.router_deployment or {}).get("status") or {}).get("readyReplicas") or 0)


def _controlled_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


# Degraded reasons that come from a referenced Secret/PVC (observe reads them again while one is shown).
PRECONDITION_REASONS = frozenset(
    {"PersistentVolumeClaimNotFound", "SecretNotFound", "TLSSecretNotFound", "TLSSecretInvalid"}
)


def _degraded_reason(cr: dict[str, Any]) -> str:
    c = get_condition((cr.get("status") or {}).get("conditions"), DEGRADED) or {}
    return str(c.get("reason") or "") if c.get("status") == "True" else ""


async def observe(kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec) -> Observed:
    """Children from the cache; the Secrets/PVCs the spec references only when they gate something.

    References are read (GET: Secrets are never cached) before the desired revision's Deployment
    exists (they gate its creation) and while the status shows one missing; once the revision
    runs, a Secret deleted under it shows in its pods (``CreateContainerConfigError``), so a resync
    of a running resource reads nothing from the API.
    """
    ns, name, uid = cr["metadata"]["namespace"], cr["metadata"]["name"], cr["metadata"]["uid"]
    selector = {b.LABEL_DEPLOYMENT: name, b.LABEL_MANAGED_BY: b.MANAGER}
    pvc_name = r.source.claim if r.source.scheme == "pvc" else None
    ref = r.spec.auth.api_key_secret_ref

    async def none() -> None:
        return None

    keda = uses_keda(r) or (cr.get("status") or {}).get("autoscaler", {}).get("provider") == "KEDA"
    (deps, pods), (svc, hpa, pdb), (so, keda_hpa, np) = await asyncio.gather(
        asyncio.gather(kube.list("Deployment", ns, selector), kube.list("Pod", ns, selector)),
        asyncio.gather(
            kube.get("Service", ns, name),
            kube.get("HorizontalPodAutoscaler", ns, name),
            kube.get("PodDisruptionBudget", ns, name),
        ),
        asyncio.gather(
            kube.get("ScaledObject", ns, name) if keda else none(),
            kube.get("HorizontalPodAutoscaler", ns, b.keda_hpa_name(name)) if keda else none(),
            kube.get("NetworkPolicy", ns, name),
        ),
    )
    if keda and keda_hpa is None:
        # KEDA makes this one and copies the ScaledObject's labels onto it, so the cache has it; a
        # miss cannot prove it absent (labels excluded by annotation, an old KEDA): ask the API.
        keda_hpa = await kube.get("HorizontalPodAutoscaler", ns, b.keda_hpa_name(name), fresh=True)
    gateway = r.spec.rollout.traffic_routing == "GatewayAPI"
    # Router pods are not cached (they lack the children's label): one LIST, only when their
    # autoglm.io/OAuth2Keys condition is wanted (status.router.auth).
    oauth2 = r.spec.router.enabled and r.spec.auth.oauth2 is not None
    route, router_pods, *route_services = await asyncio.gather(
        kube.get("HTTPRoute", ns, name) if gateway else none(),
        kube.list("Pod", ns, rb.router_selector(name)) if oauth2 else none(),
        *(kube.get("Service", ns, n) for n in b.route_service_names(name)),
    )
    revisions: dict[str, Revision] = {}
    router_deployment = next(
        (d for d in deps if d["metadata"]["name"] == f"{name}-router" and _controlled_by(d, uid)), None
    )
    for d in deps:
        if not _controlled_by(d, uid) or d["metadata"].get("deletionTimestamp"):
            continue
        rev = Revision.from_deployment(d)
        if rev.hash:
            revisions[rev.hash] = rev
    per_revision = collections.Counter((p["metadata"].get("labels") or {}).get(b.LABEL_REVISION) for p in pods)
    revisions = {h: dataclasses.replace(rv, pods=per_revision.get(h, 0)) for h, rv in revisions.items()}
    pvc = secret = tls_secret = None
    if b.revision_hash(r) not in revisions or _degraded_reason(cr) in PRECONDITION_REASONS:
        pvc, secret, tls_secret = await asyncio.gather(
            kube.get("PersistentVolumeClaim", ns, pvc_name) if pvc_name else none(),
            kube.get("Secret", ns, ref.name) if ref else none(),
            kube.get("Secret", ns, r.spec.tls.secret_ref.name) if r.spec.tls else none(),
        )
        check_refs = True
    else:
        check_refs = False
    problems: list[Problem] = []
    waiting: list[tuple[str, str, str]] = []

    def wait_for(kind: str, name: str, obj: dict[str, Any] | None) -> None:
        waiting.append((kind, name, (obj or {}).get("metadata", {}).get("resourceVersion", "")))

    if check_refs:
        if pvc_name and pvc is None:
            message = f"PersistentVolumeClaim {pvc_name} not found in namespace {ns}"
            problems.append(Problem("PersistentVolumeClaimNotFound", message))
            wait_for("PersistentVolumeClaim", pvc_name, None)
        if ref is not None:
            if secret is None:
                problems.append(Problem("SecretNotFound", f"Secret {ref.name} not found in namespace {ns}"))
                wait_for("Secret", ref.name, None)
            elif ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
                problems.append(Problem("SecretNotFound", f"Secret {ref.name} has no key {ref.key}"))
                wait_for("Secret", ref.name, secret)
        if r.spec.tls is not None:
            problem = tls_secret_problem(r.spec.tls.secret_ref.name, ns, tls_secret)
            if problem:
                problems.append(problem)
                wait_for("Secret", r.spec.tls.secret_ref.name, tls_secret)
    return Observed(
        revisions=revisions,
        pods=[p for p in pods if _controlled_by_revision(p, revisions)],
        service=svc,
        hpa=hpa,
        pdb=pdb,
        preconditions=problems,
        scaled_object=so,
        network_policy=np,
        keda_hpa=keda_hpa,
        waiting_for=waiting,
        draining=sum(n for h, n in per_revision.items() if h not in revisions),
        route=route,
        route_services=dict(zip(b.route_service_names(name), route_services, strict=True)),
        router_deployment=router_deployment,
        router_pods=router_pods or [],
    )


def tls_secret_problem(name: str, ns: str, secret: dict[str, Any] | None) -> Problem | None:
    """Why a TLS Secret cannot serve HTTPS (never fall back to plaintext): missing, wrong keys, not PEM."""
    if secret is None:
        return Problem("TLSSecretNotFound", f"Secret {name} not found in namespace {ns}")
    data = secret.get("data") or {}
    missing = [k for k in ("tls.crt", "tls.key") if not data.get(k)]
    if missing:
        return Problem(
            "TLSSecretInvalid", f"Secret {name} has no {' or '.join(missing)} (want a kubernetes.io/tls Secret)"
        )
    try:
        crt, key = (base64.b64decode(data[k]).decode() for k in ("tls.crt", "tls.key"))
    except (binascii.Error, UnicodeDecodeError):
        return Problem("TLSSecretInvalid", f"Secret {name}: tls.crt/tls.key are not PEM text")
    if "-----BEGIN CERTIFICATE-----" not in crt or "PRIVATE KEY-----" not in key:
        return Problem(
            "TLSSecretInvalid", f"Secret {name}: tls.crt must hold a PEM certificate and tls.key a PEM private key"
        )
    return None


def uses_keda(r: ResolvedSpec) -> bool:
    return r.spec.autoscaling.enabled and r.spec.autoscaling.provider == "KEDA"


def autoscaler_status(r: ResolvedSpec, obs: Observed) -> dict[str, Any] | None:
    """What the HPA (ours, or KEDA's) reports: replicas, the last metric value, why it cannot scale."""
    if not r.spec.autoscaling.enabled:
        return None
    keda = uses_keda(r)
    hpa = obs.keda_hpa if keda else obs.hpa
    out: dict[str, Any] = {"provider": r.spec.autoscaling.provider, "name": b.keda_hpa_name(r.name) if keda else r.name}
    st = (hpa or {}).get("status") or {}
    if "currentReplicas" in st:
        out["currentReplicas"] = st["currentReplicas"]
    if "desiredReplicas" in st:
        out["desiredReplicas"] = st["desiredReplicas"]
    for m in st.get("currentMetrics") or []:
        key = {"Pods": "pods", "External": "external"}.get(m.get("type", ""))
        current = ((m.get(key) or {}).get("current") or {}) if key else {}
        value = current.get("averageValue") or current.get("value")
        if value is not None:
            out["metric"] = str(value)
            break
    for c in st.get("conditions") or []:
        if c.get("status") == "False" and c.get("type") in ("ScalingActive", "AbleToScale"):
            out["message"] = f"{c.get('reason')}: {c.get('message', '')}".strip()[:500]
            break
    if hpa is None:
        out["message"] = "the HorizontalPodAutoscaler does not exist yet"
    return out


def _controlled_by_revision(pod: dict[str, Any], revisions: dict[str, Revision]) -> bool:
    return (pod["metadata"].get("labels") or {}).get(b.LABEL_REVISION) in revisions


def pod_problems(pods: Iterable[dict[str, Any]], revisions: dict[str, Revision]) -> list[Problem]:
    """Unschedulable pods and containers stuck waiting, worst first, one problem per reason."""
    by_reason: dict[str, list[tuple[str, str, str]]] = {}
    name_of = {h: rv.name for h, rv in revisions.items()}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        rev = name_of.get((pod["metadata"].get("labels") or {}).get(b.LABEL_REVISION, ""), "")
        st = pod.get("status") or {}
        scheduled = get_condition(st.get("conditions"), "PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            by_reason.setdefault("Unschedulable", []).append(
                (pod["metadata"]["name"], rev, scheduled.get("message") or "")
            )
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = BAD_WAITING.get(waiting.get("reason", ""))
            if reason:
                msg = waiting.get("message") or reason
                last = ((cs.get("lastState") or {}).get("terminated")) or {}
                if reason == "CrashLoopBackOff" and last:
                    # The container's own words (termination message, or its log tail) beat "back-off 10s".
                    said = [ln for ln in (last.get("message") or "").splitlines() if ln.strip()]
                    msg = f"container {cs.get('name')} exited with code {last.get('exitCode')}"
                    msg += f": {said[-1].strip()[:300]}" if said else ""
                by_reason.setdefault(reason, []).append((pod["metadata"]["name"], rev, msg))
    problems = []
    for reason in ("Unschedulable", *dict.fromkeys(BAD_WAITING.values())):
        hits = by_reason.get(reason)
        if hits:
            _, rev, msg = hits[0]
            problems.append(Problem(reason, f"{len(hits)} pod(s) of revision {rev}: {msg}".strip()))
    return problems


def deployment_problems(revisions: Iterable[Revision]) -> list[Problem]:
    """Pods the apiserver refuses to create (Pod Security, quota...) first, then stalled rollouts."""
    ordered = sorted(revisions, key=lambda rv: rv.name)
    return [
        Problem("PodCreationRefused", f"Deployment {rv.name}: {rv.replica_failure}")
        for rv in ordered
        if rv.replica_failure
    ] + [
        Problem("ProgressDeadlineExceeded", f"Deployment {rv.name}: {rv.deadline_exceeded}")
        for rv in ordered
        if rv.deadline_exceeded
    ]
