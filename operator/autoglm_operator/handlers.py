"""kopf wiring only: every handler is one call into the Reconciler (workqueue.py).

Why ``@kopf.on.event`` and not create/update/resume/timer handlers: event handlers are not
change-detecting, so kopf stores no ``last-handled-configuration`` annotation and no progress
annotations, adds no finalizer, and nothing is written to the objects by kopf itself. Handlers
return ``None`` (a return value would be patched into ``status``). A resync with nothing changed
therefore makes zero writes. Level-based reconcile is triggered by:

- any event of an AutoGLMDeployment (including the initial listing at start-up, which is how a
  restarted operator resumes from the cluster's state);
- any event of a child it owns (Deployments, Pods, Services, HPAs, PDBs carrying our
  ``managed-by`` label; the label selector is applied server-side so kopf never sees other objects);
- one background task that re-triggers every known resource each ``resync_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from . import builders as b
from .kube import Kube
from .models import GROUP, PLURAL, VERSION
from .settings import SettingsError, load_settings
from .workqueue import Reconciler

log = logging.getLogger("autoglm_operator")

# (group, version, plural) of the children we watch (always with our label, server-side).
CHILDREN: list[tuple[str, str, str]] = [
    ("apps", "v1", "deployments"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
]
CHILD_LABELS: dict[str, Any] = {b.LABEL_MANAGED_BY: b.MANAGER, b.LABEL_DEPLOYMENT: kopf.PRESENT}


def _selector(group: str, version: str, plural: str) -> tuple[str, str] | tuple[str, str, str]:
    return (version, plural) if group == "" else (group, version, plural)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    try:
        op = load_settings()
    except SettingsError as exc:
        raise kopf.PermanentError(f"Invalid operator settings:\n{exc}") from None
    # Peering is left to the CLI: `autoglm-operator` passes --standalone unless --peering is given
    # (a peering object is PATCHed every ~50 s, which the zero-idle-writes figure excludes).
    settings.posting.enabled = False  # our own events go through kube.py, on transitions only
    for child in CHILDREN:
        settings.watching.label_selectors[_selector(*child)] = f"{b.LABEL_MANAGED_BY}={b.MANAGER},{b.LABEL_DEPLOYMENT}"
    kube = Kube(threads=op.api_threads, timeout=op.api_timeout_seconds, qps=op.api_qps, burst=op.api_burst)
    memo.kube = kube
    memo.reconciler = Reconciler(kube, op, logger=log)
    memo.resync_task = asyncio.get_running_loop().create_task(memo.reconciler.resync_forever(), name="resync")
    log.info(
        "Started autoglm-operator: namespaces=%s resync=%ss image=%s:%s.",
        ",".join(op.namespaces) or "*",
        op.resync_seconds,
        op.default_runtime_image,
        op.default_runtime_version,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync_task")
    if task is not None:
        task.cancel()
    if memo.get("reconciler") is not None:
        await memo.reconciler.close()
    if memo.get("kube") is not None:
        memo.kube.close()


@kopf.on.probe(id="reconciles")
def probe(memo: kopf.Memo, **_: Any) -> int:
    return memo.reconciler.runs if memo.get("reconciler") is not None else 0


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_autoglmdeployment(type: str, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None  # the resource is namespaced
    memo.reconciler.observe_event(namespace, name, deleted=(type == "DELETED"))


async def on_child(labels: Mapping[str, str], namespace: str | None, memo: Any, **_: Any) -> None:
    assert namespace is not None  # every child kind is namespaced
    memo.reconciler.trigger(namespace, labels[b.LABEL_DEPLOYMENT])


for _child in CHILDREN:
    kopf.on.event(*_selector(*_child), labels=CHILD_LABELS, id=f"child-{_child[2]}")(on_child)
