"""Level-based reconcile of one AutoGLMDeployment: read everything, decide, write what differs.

The procedure, in the order a reader follows it:

1. ``observe`` (observe.py) reads the CR's children and the PVC/Secrets it references;
2. when a canary check is due, analysis.py measures it in Prometheus; the rollout policy (policy.py,
   pure) then decides which revision is stable, which is the canary, their pods, which go;
3. one ``sync_*`` per child kind (sync.py) writes only what differs from what was observed;
4. the status (status.py, pure) is computed from what is there now and written only if it changed;
   events are posted only on transitions.

Running it twice in a row with nothing changed makes zero writes. ``Reconciler`` (workqueue.py)
decides when it runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from . import builders as b
from .analysis import analyse_if_due
from .kube import KubeAPI
from .models import InvalidSpec, resolve_spec
from .observe import autoscaler_status, deployment_problems, observe, pod_problems
from .policy import decide
from .rollout_state import RolloutState
from .router_sync import router_status, sync_router
from .settings import OperatorSettings
from .status import compute_status, invalid_status
from .sync import (
    Events,
    Outcome,
    clear_annotations,
    delete_revisions,
    sync_autoscaler,
    sync_deployments,
    sync_network_policy,
    sync_pdb,
    sync_route,
    sync_service,
    write_status,
)

log = logging.getLogger(__name__)

CR_KIND = "AutoGLMDeployment"


async def reconcile(
    kube: KubeAPI,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    logger: Any = log,
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
        await write_status(kube, cr, old_status, invalid_status(cr, str(exc)), out, logger)
        return out

    desired_hash = b.revision_hash(r)
    obs = await observe(kube, cr, r)
    now = dt.datetime.now(dt.UTC)
    state = RolloutState.from_status(name, old_status)
    analysis = await analyse_if_due(r, state, desired_hash, now, settings.prometheus_address)
    decision = decide(
        r=r,
        desired=desired_hash,
        revisions=obs.revisions,
        state=state,
        now=now,
        analysis=analysis,
        annotations=cr["metadata"].get("annotations") or {},
        draining=obs.draining,
    )
    events: Events = list(decision.events)

    await sync_deployments(kube, cr, r, desired_hash, decision, obs, out, events, logger)
    await sync_service(kube, cr, r, decision, obs, out, logger)
    await sync_route(kube, cr, r, decision, obs, out, logger)
    autoscaler_problems = await sync_autoscaler(kube, settings, cr, r, decision, obs, out, logger)
    await sync_pdb(kube, cr, r, decision, obs, out, logger)
    await sync_network_policy(kube, cr, r, obs, out, logger)
    await sync_router(kube, settings, cr, r, obs, out, logger)
    await delete_revisions(kube, cr, decision, obs, out, events, logger)

    if out.writes:  # the status shows what is there now (the decision stands: it is not taken twice)
        obs = await observe(kube, cr, r)
    problems = (
        ([decision.problem] if decision.problem else [])
        + out.conflicts
        + obs.preconditions
        + autoscaler_problems
        + pod_problems(obs.pods, obs.revisions)
        + deployment_problems(obs.revisions.values())
    )
    new_status = compute_status(cr=cr, r=r, decision=decision, revisions=obs.revisions, problems=problems)
    autoscaler = autoscaler_status(r, obs)
    if autoscaler is not None:
        new_status["autoscaler"] = autoscaler
    router = router_status(r, obs, decision)
    if router is not None:
        new_status["router"] = router
    out.requeue_after = decision.requeue_after  # the rollout's clock: pause end, next check, deadline
    # Secrets and PVCs are not watched (watching every Secret is costly and sensitive): the
    # Reconciler's one shared poll looks at those it waits for and reconciles when one changes.
    out.waiting_for = obs.waiting_for
    await write_status(kube, cr, old_status, new_status, out, logger, events)
    await clear_annotations(kube, cr, decision.clear_annotations, out)  # after the status that records the act
    return out
