"""kopf wiring only: every handler is one call into the Reconciler (workqueue.py).

Why ``@kopf.on.event`` and not create/update/resume/timer handlers: event handlers are not
change-detecting, so kopf stores no ``last-handled-configuration`` annotation and no progress
annotations, adds no finalizer, and nothing is written to the objects by kopf itself. Handlers
return ``None`` (a return value would be patched into ``status``). A resync with nothing changed
therefore makes zero writes. Level-based reconcile is triggered by:

- any event of an AutoGLMDeployment (including the initial listing at start-up, which is how a
  restarted operator resumes from the cluster's state);
- any event of a child it owns (Deployments, Pods, Services, HPAs, PDBs, NetworkPolicies,
  ScaledObjects, HTTPRoutes carrying our ``managed-by`` label; the label selector is applied
  server-side so kopf never sees other objects);
- one background task that re-triggers every known resource each ``resync_seconds``.

Reads come from one ``@kopf.index`` per kind (cache.py), fed by the same watch streams: a
reconcile with nothing changed reads nothing from the API and writes nothing. Three background
tasks: the resync, the shared poll of awaited Secrets/PVCs (workqueue.py) and the cache audit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import kopf

from . import builders as b
from . import metrics
from .cache import CACHED, CachedKube, audit_forever, index_id, index_keys, slim
from .kube import Kube
from .leader import LeaderElector
from .models import GROUP, PLURAL, VERSION
from .settings import SettingsError, load_settings
from .workqueue import Reconciler

log = logging.getLogger("autoglm_operator")

# (group, version, plural) of the children we watch (always with our label, server-side); a kind whose
# CRD is missing (ScaledObject without KEDA, HTTPRoute without the Gateway API) is simply not watched
# (kopf re-scans for it).
CHILDREN: list[tuple[str, str, str]] = [ref for kind, ref in CACHED.items() if kind != "AutoGLMDeployment"]
CHILD_LABELS: dict[str, Any] = {b.LABEL_MANAGED_BY: b.MANAGER, b.LABEL_DEPLOYMENT: kopf.PRESENT}


def _selector(group: str, version: str, plural: str) -> tuple[str, str] | tuple[str, str, str]:
    return (version, plural) if group == "" else (group, version, plural)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    try:
        op = load_settings()
    except SettingsError as exc:
        raise kopf.PermanentError(f"Invalid operator settings:\n{exc}") from None
    # kopf's peering is off (`autoglm-operator` passes --standalone): one active replica comes from
    # our own Lease (leader.py explains why), when AUTOGLM_OPERATOR_LEADER_ELECTION is true.
    settings.posting.enabled = False  # our own events go through kube.py, on transitions only
    for child in CHILDREN:
        settings.watching.label_selectors[_selector(*child)] = f"{b.LABEL_MANAGED_BY}={b.MANAGER},{b.LABEL_DEPLOYMENT}"
    kube = Kube(threads=op.api_threads, timeout=op.api_timeout_seconds, qps=op.api_qps, burst=op.api_burst)
    # After the client (a startup that fails there holds no port when kopf retries it), and only once.
    if op.metrics_port and memo.get("metrics_server") is None:
        try:
            memo.metrics_server = metrics.serve(op.metrics_port, op.metrics_address)
        except OSError as exc:
            raise kopf.PermanentError(
                f"Cannot serve metrics on {op.metrics_address}:{op.metrics_port}: {exc}"
            ) from None
    memo.kube = kube
    # kopf hands startup handlers the (still empty) indexes; they fill before any other handler runs.
    indexes = {kind: kwargs[index_id(kind)] for kind in CACHED}
    cache = CachedKube(kube, indexes)
    memo.reconciler = Reconciler(cache, op, logger=log, api=kube)
    memo.leader = None
    loop = asyncio.get_running_loop()

    def start_acting() -> None:
        memo.reconciler.trigger_all()  # a standby taking over: everything it has seen meanwhile
        memo.resync_task = loop.create_task(memo.reconciler.resync_forever(), name="resync")
        memo.poll_task = loop.create_task(memo.reconciler.poll_preconditions_forever(), name="preconditions")
        memo.audit_task = loop.create_task(
            audit_forever(cache, lambda: memo.reconciler.known, memo.reconciler.trigger, op.cache_audit_seconds),
            name="cache-audit",
        )

    if op.leader_election:
        # Standby until the Lease is ours: kopf's watches run (``seen`` keeps the resources known, the
        # indexes stay warm) but nothing is reconciled. A leader that loses the Lease stops acting and
        # exits (restarted as a standby), as client-go's leader election does.
        memo.leader = LeaderElector(
            kube,
            op.leader_election_namespace,
            op.leader_election_name,
            on_started_leading=start_acting,
            on_stopped_leading=lambda: os.kill(os.getpid(), signal.SIGTERM),
        )
        memo.leader_task = loop.create_task(memo.leader.run(), name="leader-election")
    else:
        start_acting()
    log.info(
        "Started autoglm-operator: namespaces=%s resync=%ss metrics=%s image=%s:%s.",
        ",".join(op.namespaces) or "*",
        op.resync_seconds,
        f"{op.metrics_address}:{op.metrics_port}" if op.metrics_port else "off",
        op.default_runtime_image,
        op.default_runtime_version,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for name in ("leader_task", "resync_task", "poll_task", "audit_task"):
        task = memo.get(name)
        if task is not None:
            task.cancel()
    if memo.get("reconciler") is not None:
        await memo.reconciler.close()
    if memo.get("leader") is not None:  # after the last reconcile: never two acting at once
        await memo.leader.release()
    if memo.get("kube") is not None:
        memo.kube.close()
    if memo.get("metrics_server") is not None:
        memo.metrics_server.shutdown()
        memo.metrics_server.server_close()
    metrics.PHASES.clear()


@kopf.on.probe(id="reconciles")
def probe(memo: kopf.Memo, **_: Any) -> int:
    return memo.reconciler.runs if memo.get("reconciler") is not None else 0


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_autoglmdeployment(
    type: str, namespace: str | None, name: str, status: Mapping[str, Any], memo: Any, **_: Any
) -> None:
    assert namespace is not None  # the resource is namespaced
    if type == "DELETED":
        metrics.PHASES.forget(namespace, name)
    else:
        metrics.PHASES.set(namespace, name, status.get("phase"), status.get("rolloutPhase"))
    if _acting(memo):
        memo.reconciler.observe_event(namespace, name, deleted=(type == "DELETED"))
    elif type == "DELETED":
        memo.reconciler.forget(namespace, name)
    else:
        memo.reconciler.seen(namespace, name)  # a standby remembers, reconciles once it leads


async def on_child(labels: Mapping[str, str], namespace: str | None, memo: Any, **_: Any) -> None:
    assert namespace is not None  # every child kind is namespaced
    if _acting(memo):
        memo.reconciler.trigger(namespace, labels[b.LABEL_DEPLOYMENT])


def _acting(memo: Any) -> bool:
    """Without leader election always; with it, only while this process holds the Lease."""
    return memo.leader is None or memo.leader.leading


for _child in CHILDREN:
    kopf.on.event(*_selector(*_child), labels=CHILD_LABELS, id=f"child-{_child[2]}")(on_child)


def _indexer(kind: str) -> Any:
    async def index_object(
        namespace: str | None, name: str, labels: Mapping[str, str], body: kopf.Body, **_: Any
    ) -> Any:
        """The object (what reconcile reads of it), by name and by owner: cache.py serves reads from these."""
        assert namespace is not None  # every cached kind is namespaced
        obj = slim(kind, body)
        return {key: obj for key in index_keys(namespace, name, labels)}

    return index_object


for _kind, _ref in CACHED.items():
    _labels = None if _kind == "AutoGLMDeployment" else CHILD_LABELS
    kopf.index(*_selector(*_ref), labels=_labels, id=index_id(_kind))(_indexer(_kind))
