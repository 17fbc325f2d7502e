"""``autoglm rollout status|promote|abort|pause|resume|undo NAME [-n NS] [--watch] [--timeout S]``.

Installed as ``autoglm`` and as the kubectl plugin ``kubectl-autoglm`` (``kubectl autoglm rollout ...``).
It talks to the cluster of the current kubeconfig context (or $KUBECONFIG) with the kubernetes client.
Every command is a read or a small patch of the AutoGLMDeployment; the operator does the rest:

- promote / abort: set ``autoglm.io/promote`` / ``autoglm.io/abort`` (the operator removes them once acted on);
- pause / resume: set / remove ``autoglm.io/paused``;
- undo: during a rollout (or after a rollback), abort it and set spec.runtime.version back to the
  stable's; after a promotion, set it to status.previousStableVersion (a canary rollout back to it).

``status --watch`` prints the rollout whenever it changes and exits like ``kubectl rollout status``:
0 once the spec's revision is promoted and the old one is gone, 1 on rollback or abort, 2 on timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from typing import Any, cast

from .conditions import get_condition, parse_time
from .models import DEFAULT_STEPS, GROUP, PLURAL, VERSION, parse_duration
from .policy import ANNOTATION_ABORT, ANNOTATION_PAUSED, ANNOTATION_PROMOTE

EXIT_DONE, EXIT_ROLLED_BACK, EXIT_TIMEOUT = 0, 1, 2


# ---------------------------------------------------------------- what the status says (pure)


def _condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return get_condition(st.get("conditions"), type_) or {}


def outcome(cr: dict[str, Any]) -> int | None:
    """EXIT_DONE when the spec's revision serves alone, EXIT_ROLLED_BACK after a rollback, else None."""
    st = cr.get("status") or {}
    if st.get("observedGeneration") != cr["metadata"].get("generation"):
        return None
    if st.get("rolloutPhase") == "RolledBack":
        return EXIT_ROLLED_BACK
    if st.get("canaryRevision") or _condition(st, "Progressing").get("status") != "False":
        return None
    return EXIT_DONE if st.get("rolloutPhase") in ("Idle", "Promoted") else None


def _ready(st: dict[str, Any], revision: str | None) -> str:
    for rv in st.get("revisions") or []:
        if rv.get("name") == revision:
            return f"{rv.get('readyReplicas', 0)}/{rv.get('replicas', 0)} ready"
    return "no pods"


def _num(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3g}{unit}"


def _steps(cr: dict[str, Any]) -> list[dict[str, Any]]:
    rollout = (cr.get("spec") or {}).get("rollout") or {}
    if "steps" in rollout:
        return list(rollout["steps"] or [])
    return [s.model_dump(by_alias=True, exclude_none=True) for s in DEFAULT_STEPS]


def format_status(cr: dict[str, Any], now: dt.datetime | None = None) -> str:
    """The rollout as ``kubectl argo rollouts get rollout`` shows one: revisions, steps, analysis, conditions."""
    now = now or dt.datetime.now(dt.UTC)
    meta, st = cr["metadata"], cr.get("status") or {}
    steps = _steps(cr)
    rollout = (cr.get("spec") or {}).get("rollout") or {}
    phase = st.get("rolloutPhase") or "Idle"
    current = st.get("currentStep")
    lines = [
        f"Name:            {meta['name']}",
        f"Namespace:       {meta.get('namespace', '')}",
        f"Status:          {st.get('phase', 'Unknown')} (rollout {phase})",
        f"Strategy:        Canary, {rollout.get('trafficRouting', 'Replicas')} routing",
    ]
    if current is not None:
        lines.append(f"  Step:          {min(current, len(steps))}/{len(steps)}")
        ready_at = parse_time(st.get("stepReadyAt"))
        if current < len(steps) and steps[current].get("pause") and ready_at is not None:
            left = parse_duration(steps[current]["pause"]) - (now - ready_at).total_seconds()
            lines.append(f"  Pause left:    {max(0, round(left))}s")
    lines.append(f"  Canary weight: {st.get('canaryWeight', 0)}%")
    stable = st.get("stableRevision")
    lines.append(f"Stable:          {stable or '-'} (version {st.get('stableVersion', '-')}), {_ready(st, stable)}")
    if st.get("canaryRevision"):
        canary = st["canaryRevision"]
        lines.append(f"Canary:          {canary} (version {st.get('canaryVersion', '-')}), {_ready(st, canary)}")
    if st.get("previousStableRevision"):
        lines.append(
            f"Previous stable: {st['previousStableRevision']} (version {st.get('previousStableVersion', '-')})"
        )
    a = st.get("lastAnalysis")
    if a:
        lines.append(
            f"Last analysis:   {a.get('verdict')} at {a.get('time')}: {_num(a.get('requests'))} requests, "
            f"success rate {_num(a.get('successRate'))}, latency p99 {_num(a.get('latencyP99'), 's')}, "
            f"TTFT p99 {_num(a.get('ttftP99'), 's')}, inter-token p99 {_num(a.get('interTokenP99'), 's')}"
        )
        lines.append(f"                 {a.get('reason', '')}")
        if st.get("failedChecks"):
            lines.append(f"  Failed checks: {st['failedChecks']}")
    lines.append("Steps:")
    for i, step in enumerate(steps):
        mark = "✔" if current is not None and i < current else "►" if i == current else " "
        pause = f", pause {step['pause']}" if step.get("pause") else ""
        lines.append(f"  {mark} {i}: weight {step['weight']}%{pause}")
    mark = "►" if current is not None and current >= len(steps) else " "
    lines.append(f"  {mark} {len(steps)}: promote (canary scaled to the stable's replicas, then 100%)")
    lines.append("Conditions:")
    for c in st.get("conditions") or []:
        lines.append(
            f"  {c.get('type', ''):<12} {c.get('status', ''):<6} {c.get('reason', ''):<22} {c.get('message', '')}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the cluster


class Client:
    """The AutoGLMDeployment API of the current kubeconfig context."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
            self.default_namespace = "default"
        except config.ConfigException:
            config.load_kube_config()
            _, active = config.list_kube_config_contexts()
            self.default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
        self.api = client.CustomObjectsApi()

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        obj = self.api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
        return cast(dict[str, Any], obj)


def _annotate(key: str, value: str | None) -> dict[str, Any]:
    return {"metadata": {"annotations": {key: value}}}


def _watch(client: Client, ns: str, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        cr = client.get(ns, name)
        text = format_status(cr)
        lines = text.splitlines()
        comparable = "\n".join(ln for ln in lines if not ln.lstrip().startswith("Pause left"))
        if comparable != shown:
            print(text + "\n", flush=True)
            shown = comparable
        result = outcome(cr)
        if result == EXIT_DONE:
            print(f'rollout of "{name}" complete: {cr["status"].get("stableRevision")} serves all traffic')
            return EXIT_DONE
        if result == EXIT_ROLLED_BACK:
            msg = _condition(cr["status"], "Degraded").get("message", "")
            print(f'error: rollout of "{name}" rolled back: {msg}', file=sys.stderr)
            return EXIT_ROLLED_BACK
        if time.monotonic() >= deadline:
            print(f'error: timed out waiting for the rollout of "{name}"', file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(2)


def run(args: argparse.Namespace, client: Client) -> int:
    ns, name = args.namespace or client.default_namespace, args.name
    cr = client.get(ns, name)
    st = cr.get("status") or {}
    in_rollout = bool(st.get("canaryRevision"))
    if args.command == "status":
        if args.watch:
            return _watch(client, ns, name, args.timeout)
        print(format_status(cr))
        return EXIT_DONE
    if args.command in ("promote", "abort") and not in_rollout:
        print(f'error: "{name}" has no rollout in progress', file=sys.stderr)
        return 1
    if args.command == "promote":
        client.patch(ns, name, _annotate(ANNOTATION_PROMOTE, "true"))
        print(f'rollout of "{name}" promoted: the canary {st["canaryRevision"]} skips its remaining steps')
    elif args.command == "abort":
        client.patch(ns, name, _annotate(ANNOTATION_ABORT, "true"))
        print(f'rollout of "{name}" aborted: {st["canaryRevision"]} goes, {st.get("stableRevision")} serves')
    elif args.command == "pause":
        client.patch(ns, name, _annotate(ANNOTATION_PAUSED, "true"))
        print(f'rollout of "{name}" paused')
    elif args.command == "resume":
        client.patch(ns, name, _annotate(ANNOTATION_PAUSED, None))
        print(f'rollout of "{name}" resumed')
    elif args.command == "undo":
        # Mid-rollout or rolled back, the spec is ahead of the stable: back to the stable's version.
        # Otherwise back to the version the last promotion replaced (a canary rollout of it).
        to_stable = in_rollout or st.get("rolloutPhase") == "RolledBack"
        target = st.get("stableVersion") if to_stable else st.get("previousStableVersion")
        if not target:
            print(f'error: "{name}" has no previous version to go back to', file=sys.stderr)
            return 1
        patch: dict[str, Any] = {"spec": {"runtime": {"version": target}}}
        if in_rollout:
            patch.update(_annotate(ANNOTATION_ABORT, "true"))
        client.patch(ns, name, patch)
        print(f'rollout of "{name}" undone: spec.runtime.version is {target} again')
    return EXIT_DONE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoglm", description="Control AutoGLMDeployment rollouts.")
    sub = p.add_subparsers(dest="group", required=True)
    rollout = sub.add_parser("rollout", help="canary rollouts of an AutoGLMDeployment")
    commands = rollout.add_subparsers(dest="command", required=True)
    helps = {
        "status": "show the rollout (--watch: until promoted, exit 0, or rolled back, exit 1)",
        "promote": "skip the remaining steps: scale the canary to full and promote it",
        "abort": "roll the canary back now",
        "pause": "hold the canary at its current step",
        "resume": "continue a paused rollout (the step's pause starts again)",
        "undo": "abort a rollout and return the spec to the stable's version, or go back to the previous one",
    }
    for command, text in helps.items():
        c = commands.add_parser(command, help=text, description=text)
        c.add_argument("name", help="the AutoGLMDeployment")
        c.add_argument("-n", "--namespace", help="its namespace (default: the kubeconfig context's)")
        if command == "status":
            c.add_argument("-w", "--watch", action="store_true", help="follow the rollout until it ends")
            c.add_argument("--timeout", type=float, default=1800.0, help="seconds --watch waits (default 1800)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from kubernetes.client.exceptions import ApiException

    try:
        return run(args, Client())
    except ApiException as exc:
        print(f"error: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
