"""Level-based reconcile of one AutoGLMDeployment.

``reconcile()`` reads all the state (the CR, its Deployments, pods, Service, HPA, PDB, the PVC and
Secret it references), decides what should exist (pure functions below), writes only what differs,
computes the status from what it then observes, writes the status only if it changed, and posts
events only on transitions. Running it twice in a row with nothing changed makes zero writes.

``Reconciler`` serialises runs per resource (one asyncio.Lock each), coalesces bursts of triggers
into one run, bounds concurrency, and retries failures with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import builders as b
from .conditions import DEGRADED, PROGRESSING, READY, get_condition, now_rfc3339, set_condition
from .kube import ApiError, KubeAPI
from .models import InvalidSpec, ResolvedSpec, resolve_spec
from .settings import OperatorSettings

log = logging.getLogger(__name__)

CR_KIND = "AutoGLMDeployment"
PRECONDITION_POLL_SECONDS = 5.0
BAD_WAITING = {
    "CrashLoopBackOff": "CrashLoopBackOff",
    "ImagePullBackOff": "ImagePullBackOff",
    "ErrImagePull": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CreateContainerError": "CreateContainerError",
}


# ==================================================================== observed state


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

    @property
    def is_ready(self) -> bool:
        return self.current and self.ready >= self.desired and self.updated >= self.desired

    @classmethod
    def from_deployment(cls, d: dict[str, Any]) -> Revision:
        meta, spec, st = d["metadata"], d.get("spec") or {}, d.get("status") or {}
        labels = meta.get("labels") or {}
        deadline = ""
        for c in st.get("conditions") or []:
            if (
                c.get("type") == "Progressing"
                and c.get("status") == "False"
                and c.get("reason") == "ProgressDeadlineExceeded"
            ):
                deadline = c.get("message") or "progress deadline exceeded"
        failure = next(
            (
                c.get("message") or c.get("reason") or "pods cannot be created"
                for c in st.get("conditions") or []
                if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
            ),
            "",
        )
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
        )


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


def _controlled_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


async def observe(kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec) -> Observed:
    ns, name, uid = cr["metadata"]["namespace"], cr["metadata"]["name"], cr["metadata"]["uid"]
    selector = f"{b.LABEL_DEPLOYMENT}={name},{b.MANAGED_SELECTOR}"
    pvc_name = r.source.claim if r.source.scheme == "pvc" else None
    ref = r.spec.auth.api_key_secret_ref

    async def none() -> None:
        return None

    keda = uses_keda(r) or (cr.get("status") or {}).get("autoscaler", {}).get("provider") == "KEDA"
    (deps, pods), (svc, hpa, pdb, pvc, secret, tls_secret), (so, keda_hpa, np) = await asyncio.gather(
        asyncio.gather(kube.list("Deployment", ns, selector), kube.list("Pod", ns, selector)),
        asyncio.gather(
            kube.get("Service", ns, name),
            kube.get("HorizontalPodAutoscaler", ns, name),
            kube.get("PodDisruptionBudget", ns, name),
            kube.get("PersistentVolumeClaim", ns, pvc_name) if pvc_name else none(),
            kube.get("Secret", ns, ref.name) if ref else none(),
            kube.get("Secret", ns, r.spec.tls.secret_ref.name) if r.spec.tls else none(),
        ),
        asyncio.gather(
            kube.get("ScaledObject", ns, name) if keda else none(),
            kube.get("HorizontalPodAutoscaler", ns, b.keda_hpa_name(name)) if keda else none(),
            kube.get("NetworkPolicy", ns, name),
        ),
    )
    revisions: dict[str, Revision] = {}
    for d in deps:
        if not _controlled_by(d, uid) or d["metadata"].get("deletionTimestamp"):
            continue
        rev = Revision.from_deployment(d)
        if rev.hash:
            revisions[rev.hash] = rev
    problems: list[Problem] = []
    if pvc_name and pvc is None:
        problems.append(
            Problem("PersistentVolumeClaimNotFound", f"PersistentVolumeClaim {pvc_name} not found in namespace {ns}")
        )
    if ref is not None:
        if secret is None:
            problems.append(Problem("SecretNotFound", f"Secret {ref.name} not found in namespace {ns}"))
        elif ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
            problems.append(Problem("SecretNotFound", f"Secret {ref.name} has no key {ref.key}"))
    if r.spec.tls is not None:
        problem = tls_secret_problem(r.spec.tls.secret_ref.name, ns, tls_secret)
        if problem:
            problems.append(problem)
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


# ==================================================================== pure decisions


@dataclasses.dataclass(frozen=True)
class Decision:
    stable: str  # hash of the revision that serves (may not exist yet on first rollout)
    candidate: str | None  # hash rolling out, not yet serving
    promote: bool  # the desired revision just became Ready and takes over now
    delete: tuple[str, ...]  # hashes whose Deployments go


def decide_revisions(desired: str, revisions: dict[str, Revision], previous_stable: str | None) -> Decision:
    """Which revision serves, which rolls out, which go.

    The previous stable revision keeps serving until the desired one is Ready; then the desired
    one is promoted and every other revision is deleted. Revisions that are neither (an
    intermediate edit that never became Ready) are deleted at once. With no status (restart after
    a crash before the first status write) the old revision with most ready pods serves.
    """
    others = {h: rv for h, rv in revisions.items() if h != desired}
    new = revisions.get(desired)
    if not others:
        return Decision(stable=desired, candidate=None, promote=False, delete=())
    if new is not None and new.is_ready:
        return Decision(stable=desired, candidate=None, promote=True, delete=tuple(sorted(others)))
    prev = next((h for h, rv in others.items() if rv.name == previous_stable), None)
    if prev is None:
        prev = max(others.values(), key=lambda rv: (rv.ready, rv.created, rv.name)).hash
    return Decision(stable=prev, candidate=desired, promote=False, delete=tuple(sorted(h for h in others if h != prev)))


def wanted_replicas(r: ResolvedSpec, rev_hash: str, decision: Decision, revisions: dict[str, Revision]) -> int | None:
    """spec.replicas for a revision's Deployment; ``None`` = leave it alone (the HPA owns it)."""
    a = r.spec.autoscaling
    if not a.enabled:
        return r.spec.fixed_replicas
    lo, hi = a.bounds
    stable = revisions.get(decision.stable)
    if rev_hash == decision.stable:
        return None if stable is not None else lo
    base = stable.desired if stable is not None else lo
    return min(max(base, lo), hi)


def desired_replicas(r: ResolvedSpec, decision: Decision, revisions: dict[str, Revision]) -> int:
    """Pods wanted now for the serving revision (spec.replicas, or the autoscaler's choice)."""
    if not r.spec.autoscaling.enabled:
        return r.spec.fixed_replicas
    stable = revisions.get(decision.stable)
    return stable.desired if stable is not None else r.spec.autoscaling.bounds[0]


def pod_problems(pods: Iterable[dict[str, Any]], revisions: dict[str, Revision]) -> list[Problem]:
    """Unschedulable pods and containers stuck waiting, worst first, one problem per reason."""
    by_reason: dict[str, list[tuple[str, str, str]]] = {}
    name_of = {h: rv.name for h, rv in revisions.items()}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        rev = name_of.get((pod["metadata"].get("labels") or {}).get(b.LABEL_REVISION, ""), "")
        st = pod.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                by_reason.setdefault("Unschedulable", []).append((pod["metadata"]["name"], rev, c.get("message") or ""))
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


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def compute_status(
    *,
    cr: dict[str, Any],
    r: ResolvedSpec,
    desired_hash: str,
    decision: Decision,
    revisions: dict[str, Revision],
    problems: list[Problem],
    now: str | None = None,
) -> dict[str, Any]:
    """The status the CR should show, from what was observed (pure)."""
    meta = cr["metadata"]
    name, ns, generation = meta["name"], meta["namespace"], meta.get("generation")
    old = cr.get("status") or {}
    now = now or now_rfc3339()

    stable = revisions.get(decision.stable)
    stable_name = b.revision_name(name, decision.stable)
    desired = desired_replicas(r, decision, revisions)
    ready = stable.ready if stable else 0
    ready_ok = stable is not None and ready >= desired
    cand = revisions.get(decision.candidate) if decision.candidate else None
    cand_name = b.revision_name(name, decision.candidate) if decision.candidate else None
    problem = problems[0] if problems else None

    if problem:
        phase = "Degraded"
    elif decision.candidate:
        phase = "Progressing"
    elif stable is None or (ready == 0 and desired > 0):
        phase = "Pending"
    elif ready_ok and stable.is_ready:
        phase = "Healthy"
    else:
        phase = "Progressing"

    conds = old.get("conditions") or []
    ready_msg = f"{ready}/{desired} replicas of revision {stable_name} are ready"
    if stable is None:
        conds = set_condition(
            conds,
            READY,
            False,
            "RevisionNotCreated",
            f"Deployment {stable_name} does not exist yet",
            observed_generation=generation,
            now=now,
        )
    elif ready_ok:
        conds = set_condition(conds, READY, True, "ReplicasReady", ready_msg, observed_generation=generation, now=now)
    else:
        conds = set_condition(
            conds, READY, False, "ReplicasNotReady", ready_msg, observed_generation=generation, now=now
        )

    if decision.candidate:
        c_ready, c_desired = (cand.ready, cand.desired) if cand else (0, 0)
        msg = (
            f"Revision {cand_name} is rolling out ({c_ready}/{c_desired} ready); "
            f"revision {stable_name} serves until it is ready"
        )
        conds = set_condition(
            conds, PROGRESSING, True, "RolloutInProgress", msg, observed_generation=generation, now=now
        )
    elif not (ready_ok and stable is not None and stable.is_ready):
        conds = set_condition(
            conds,
            PROGRESSING,
            True,
            "WaitingForReplicas",
            f"Waiting for revision {stable_name}: {ready_msg}",
            observed_generation=generation,
            now=now,
        )
    else:
        conds = set_condition(
            conds,
            PROGRESSING,
            False,
            "RolloutComplete",
            f"Revision {stable_name} is serving",
            observed_generation=generation,
            now=now,
        )

    if problem:
        conds = set_condition(
            conds, DEGRADED, True, problem.reason, problem.message, observed_generation=generation, now=now
        )
    else:
        conds = set_condition(conds, DEGRADED, False, "AsExpected", "", observed_generation=generation, now=now)

    stable_version: str | None
    if stable is not None:
        stable_version = stable.version
    elif decision.stable == desired_hash:
        stable_version = r.version
    else:
        stable_version = old.get("stableVersion")

    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "ready": f"{ready}/{desired}",
        "replicas": sum(rv.replicas for rv in revisions.values()),
        "readyReplicas": sum(rv.ready for rv in revisions.values()),
        "desiredReplicas": desired,
        "selector": b.selector_string(b.selector_labels(name)),
        "stableRevision": stable_name,
        "stableVersion": stable_version,
        "canaryRevision": cand_name,
        "canaryVersion": r.version if decision.candidate else None,
        "canaryWeight": 0,
        "endpoint": b.endpoint(name, ns, tls=r.spec.tls is not None),
        "revisions": [
            {"name": rv.name, "version": rv.version, "replicas": rv.replicas, "readyReplicas": rv.ready}
            for rv in sorted(revisions.values(), key=lambda rv: rv.name)
        ],
        "conditions": conds,
    }
    return _strip_none(status)


def invalid_status(cr: dict[str, Any], message: str, now: str | None = None) -> dict[str, Any]:
    """Status for a spec the operator cannot act on: Degraded/InvalidSpec, children untouched."""
    old = dict(cr.get("status") or {})
    gen = cr["metadata"].get("generation")
    conds = set_condition(
        old.get("conditions"), DEGRADED, True, "InvalidSpec", message, observed_generation=gen, now=now
    )
    return _strip_none({**old, "phase": "Degraded", "observedGeneration": gen, "conditions": conds})


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch turning ``old`` into ``new`` (removed keys → null); ``None`` when equal."""
    if old == new:
        return None
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if old.get(k) != v:
            o = old.get(k)
            patch[k] = status_patch(o, v) if isinstance(o, dict) and isinstance(v, dict) else v
    return patch


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) for what changed between two statuses."""
    events: list[tuple[str, str, str]] = []
    old_c, new_c = old.get("conditions"), new.get("conditions")
    o_ready, n_ready = get_condition(old_c, READY), get_condition(new_c, READY)
    if n_ready and n_ready["status"] == "True" and (not o_ready or o_ready.get("status") != "True"):
        events.append(("Normal", "Ready", n_ready.get("message", "")))
    o_deg, n_deg = get_condition(old_c, DEGRADED), get_condition(new_c, DEGRADED)
    if n_deg and n_deg["status"] == "True":
        if not o_deg or o_deg.get("status") != "True" or o_deg.get("reason") != n_deg.get("reason"):
            events.append(("Warning", "Degraded", f"{n_deg.get('reason')}: {n_deg.get('message', '')}"))
    elif n_deg and o_deg and o_deg.get("status") == "True":
        events.append(("Normal", "Recovered", f"No longer degraded (was {o_deg.get('reason')})"))
    o_des, n_des = old.get("desiredReplicas"), new.get("desiredReplicas")
    if o_des is not None and n_des is not None and o_des != n_des:
        reason = "ScaledUp" if n_des > o_des else "ScaledDown"
        events.append(("Normal", reason, f"Desired replicas changed from {o_des} to {n_des}"))
    o_st, n_st = old.get("stableRevision"), new.get("stableRevision")
    if o_st and n_st and o_st != n_st:
        events.append(
            (
                "Normal",
                "RevisionPromoted",
                f"Revision {n_st} (version {new.get('stableVersion')}) replaced {o_st} and serves all traffic",
            )
        )
    return events


def needs_update(desired: Any, actual: Any) -> bool:
    """True when ``desired`` is not contained in ``actual`` (lists: same length, item-wise).

    Server defaults (extra keys in ``actual``) never cause an update; missing or different values do.
    """
    return not _subset(desired, actual)


def _subset(desired: Any, actual: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    return desired == actual


def _child_differs(
    desired: dict[str, Any], actual: dict[str, Any] | None, exact: Callable[[dict], Any] | None = None
) -> bool:
    if actual is None:
        return True
    keys = {"metadata": {k: desired["metadata"][k] for k in ("labels", "ownerReferences")}, "spec": desired["spec"]}
    if needs_update(keys, actual):
        return True
    return exact is not None and exact(desired) != exact(actual)


# ==================================================================== the reconcile


@dataclasses.dataclass
class Outcome:
    writes: int = 0
    status_written: bool = False
    gone: bool = False
    requeue_after: float | None = None  # poll again (for state we do not watch: PVCs, Secrets)


async def reconcile(
    kube: KubeAPI,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> Outcome:
    out = Outcome()
    cr = await kube.get(CR_KIND, namespace, name)
    if cr is None or cr["metadata"].get("deletionTimestamp"):
        out.gone = True  # children go by garbage collection (ownerReferences)
        return out
    cr.setdefault("apiVersion", "autoglm.io/v1alpha1")
    cr.setdefault("kind", CR_KIND)
    old_status = cr.get("status") or {}

    try:
        r = resolve_spec(
            name,
            namespace,
            cr.get("spec"),
            default_image=settings.default_runtime_image,
            default_version=settings.default_runtime_version,
        )
    except InvalidSpec as exc:
        await _write_status(kube, cr, old_status, invalid_status(cr, str(exc)), out, logger)
        return out

    desired_hash = b.revision_hash(r)
    obs = await observe(kube, cr, r)
    decision = decide_revisions(desired_hash, obs.revisions, old_status.get("stableRevision"))
    events: list[tuple[str, str, str]] = []

    # 1. Deployments: the desired revision, then the others' replicas.
    for rev_hash in [desired_hash] + sorted(h for h in obs.revisions if h != desired_hash):
        if rev_hash in decision.delete:
            continue
        want = wanted_replicas(r, rev_hash, decision, obs.revisions)
        existing = obs.revisions.get(rev_hash)
        if rev_hash == desired_hash:
            body = b.build_deployment(cr, r, rev_hash, replicas=want if want is not None else 1)
            if existing is None:
                if obs.preconditions:
                    continue  # cannot run without its PVC/Secret: wait (status says why)
                out.writes += 1
                if await kube.create("Deployment", namespace, body) is not None:
                    logger.info("Created revision %s (version %s).", body["metadata"]["name"], r.version)
                    events.append(
                        (
                            "Normal",
                            "RevisionCreated",
                            f"Created revision {body['metadata']['name']} (version {r.version})",
                        )
                    )
                continue
            if existing.spec_hash != body["metadata"]["annotations"][b.ANNOTATION_SPEC_HASH]:
                body["spec"]["replicas"] = existing.desired if want is None else want
                current = await kube.get("Deployment", namespace, existing.name)
                if current is not None:
                    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    out.writes += 1
                    await kube.replace("Deployment", namespace, existing.name, body)
                    logger.info("Updated deployment %s to the current template.", existing.name)
                continue
        if existing is not None and want is not None and existing.desired != want:
            out.writes += 1
            await kube.patch("Deployment", namespace, existing.name, {"spec": {"replicas": want}})
            logger.info("Scaled deployment %s from %d to %d replicas.", existing.name, existing.desired, want)

    # 2. Service: selects the serving revision only.
    svc = b.build_service(cr, r, [decision.stable])
    if _child_differs(svc, obs.service, exact=lambda o: (o.get("spec") or {}).get("selector")):
        out.writes += 1
        await kube.apply("Service", namespace, svc)
        logger.info("Applied service %s selecting revision %s.", name, b.revision_name(name, decision.stable))

    # 3. The autoscaler on the serving revision: our HPA, or a KEDA ScaledObject (KEDA makes the HPA).
    a = r.spec.autoscaling
    hpa = b.build_hpa(cr, r, b.revision_name(name, decision.stable)) if a.enabled and a.provider == "HPA" else None
    await _sync_optional_child(kube, cr, "HorizontalPodAutoscaler", "autoscaler", hpa, obs.hpa, out, logger)
    autoscaler_problems: list[Problem] = []
    prometheus = a.prometheus.address or settings.prometheus_address
    so = None
    if uses_keda(r):
        if prometheus:
            so = b.build_scaled_object(cr, r, decision.stable, prometheus)
        else:
            autoscaler_problems.append(
                Problem(
                    "PrometheusAddressMissing",
                    (
                        "autoscaling.provider KEDA needs a Prometheus: set spec.autoscaling.prometheus.address "
                        "or the operator's AUTOGLM_OPERATOR_PROMETHEUS_ADDRESS"
                    ),
                )
            )
    if so is not None or obs.scaled_object is not None:
        try:
            await _sync_optional_child(kube, cr, "ScaledObject", "scaled object", so, obs.scaled_object, out, logger)
        except ApiError as exc:
            if exc.status != 404:
                raise
            autoscaler_problems.append(
                Problem(
                    "KEDANotInstalled",
                    (
                        "autoscaling.provider is KEDA but this cluster has no scaledobjects.keda.sh "
                        "(install KEDA, or use provider HPA)"
                    ),
                )
            )

    # 4. PDB when more than one replica is wanted.
    pdb = b.build_pdb(cr, r) if desired_replicas(r, decision, obs.revisions) > 1 else None
    await _sync_optional_child(kube, cr, "PodDisruptionBudget", "disruption budget", pdb, obs.pdb, out, logger)
    netpol = b.build_network_policy(cr, r) if r.spec.network_policy.enabled else None
    await _sync_optional_child(kube, cr, "NetworkPolicy", "network policy", netpol, obs.network_policy, out, logger)

    # 5. Old revisions go only after the Service points at the serving one.
    for rev_hash in decision.delete:
        rv = obs.revisions[rev_hash]
        out.writes += 1
        if await kube.delete("Deployment", namespace, rv.name, uid=rv.uid):
            logger.info("Deleted revision %s.", rv.name)
            events.append(("Normal", "RevisionDeleted", f"Deleted revision {rv.name} (version {rv.version})"))

    # 6. Status from what is there now.
    if out.writes:
        obs = await observe(kube, cr, r)
        decision = decide_revisions(desired_hash, obs.revisions, b.revision_name(name, decision.stable))
    problems = (
        obs.preconditions
        + autoscaler_problems
        + pod_problems(obs.pods, obs.revisions)
        + deployment_problems(obs.revisions.values())
    )
    new_status = compute_status(
        cr=cr, r=r, desired_hash=desired_hash, decision=decision, revisions=obs.revisions, problems=problems
    )
    autoscaler = autoscaler_status(r, obs)
    if autoscaler is not None:
        new_status["autoscaler"] = autoscaler
    if obs.preconditions:
        # Secrets and PVCs are not watched (watching every Secret is costly and sensitive): poll.
        out.requeue_after = PRECONDITION_POLL_SECONDS
    await _write_status(kube, cr, old_status, new_status, out, logger, events)
    return out


async def _sync_optional_child(
    kube: Any,
    cr: dict[str, Any],
    kind: str,
    what: str,
    desired: dict[str, Any] | None,
    observed: dict[str, Any] | None,
    out: Outcome,
    logger: Any,
) -> None:
    """A child that exists only when wanted: apply it when it differs, delete it (if ours) when not wanted."""
    namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    if desired is not None:
        if _child_differs(desired, observed):
            out.writes += 1
            await kube.apply(kind, namespace, desired)
            logger.info("Applied %s %s.", what, name)
    elif observed is not None and _controlled_by(observed, cr["metadata"]["uid"]):
        out.writes += 1
        await kube.delete(kind, namespace, name)
        logger.info("Deleted %s %s.", what, name)


async def _write_status(
    kube: KubeAPI,
    cr: dict[str, Any],
    old: dict[str, Any],
    new: dict[str, Any],
    out: Outcome,
    logger: Any,
    events: list[tuple[str, str, str]] | None = None,
) -> None:
    events = list(events or [])
    patch = status_patch(old, new)
    if patch is not None:
        out.writes += 1
        out.status_written = True
        if await kube.patch_status(cr["metadata"]["namespace"], cr["metadata"]["name"], patch) is None:
            return
        if old.get("phase") != new.get("phase"):
            logger.info(
                "Changed phase of %s from %s to %s.", cr["metadata"]["name"], old.get("phase"), new.get("phase")
            )
        events += transition_events(old, new)
    for type_, reason, message in events:
        out.writes += 1
        await kube.post_event(cr, type_, reason, message)


# ==================================================================== scheduling


class Reconciler:
    """Runs ``reconcile`` per resource: serialised, coalesced, bounded, retried with backoff."""

    def __init__(self, kube: KubeAPI, settings: OperatorSettings, logger: logging.Logger = log) -> None:
        self.kube = kube
        self.settings = settings
        self.log = logger
        self.known: set[tuple[str, str]] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str], int] = {}
        self._retry_handles: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(settings.max_concurrent_reconciles)
        self.runs = 0
        self.last_durations: list[float] = []

    def seen(self, namespace: str, name: str) -> None:
        self.known.add((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.known.discard(key)
        self._failures.pop(key, None)
        handle = self._retry_handles.pop(key, None)
        if handle:
            handle.cancel()

    def observe_event(self, namespace: str, name: str, *, deleted: bool = False) -> None:
        """An AutoGLMDeployment event: remember it (for the resync) and reconcile it."""
        if deleted:
            self.forget(namespace, name)
            return
        self.seen(namespace, name)
        self.trigger(namespace, name)

    def trigger(self, namespace: str, name: str) -> None:
        """Ask for a reconcile; many triggers while one is queued make one run."""
        key = (namespace, name)
        if key in self._pending:
            return
        self._pending.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key), name=f"reconcile {namespace}/{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def trigger_all(self) -> None:
        for ns, name in sorted(self.known):
            self.trigger(ns, name)

    async def _run(self, key: tuple[str, str]) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock, self._sem:
                self._pending.discard(key)
                started = time.monotonic()
                try:
                    outcome = await reconcile(self.kube, self.settings, *key, logger=self.log)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried with backoff, never fatal
                    self._schedule_retry(key, exc)
                    return
                finally:
                    self.runs += 1
                    self.last_durations = (self.last_durations + [time.monotonic() - started])[-200:]
                self._failures.pop(key, None)
                if outcome.gone:
                    self.forget(*key)
                elif outcome.requeue_after:
                    self._schedule(key, outcome.requeue_after)
        finally:
            if key not in self._pending and not lock.locked():
                self._locks.pop(key, None)

    def _schedule_retry(self, key: tuple[str, str], exc: Exception) -> None:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(60.0, 0.5 * 2 ** (n - 1))
        level = logging.INFO if isinstance(exc, ApiError) and exc.status == 409 else logging.WARNING
        self.log.log(
            level,
            "Failed to reconcile %s/%s (attempt %d), retrying in %.1fs: %s",
            *key,
            n,
            delay,
            exc,
            exc_info=not isinstance(exc, ApiError),
        )
        self._schedule(key, delay)

    def _schedule(self, key: tuple[str, str], delay: float) -> None:
        old = self._retry_handles.pop(key, None)
        if old:
            old.cancel()
        self._retry_handles[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: tuple[str, str]) -> None:
        self._retry_handles.pop(key, None)
        if key in self.known:
            self.trigger(*key)

    async def resync_forever(self) -> None:
        """The one periodic safety net: re-reconcile every known resource (writes nothing if in sync)."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.trigger_all()

    async def close(self) -> None:
        for handle in self._retry_handles.values():
            handle.cancel()
        self._retry_handles.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
