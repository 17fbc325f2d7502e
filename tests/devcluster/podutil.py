"""Helpers for the process node's cluster tests: a pod body on the host image, reading pods back."""

from __future__ import annotations

import json
import urllib.request

from devcluster import HOST_IMAGE


def pod(name: str, command: list[str], **extra) -> dict:
    container = {"name": "main", "image": f"{HOST_IMAGE}:1", "command": command,
                 "ports": [{"name": "http", "containerPort": 8080}], **extra.pop("container", {})}
    spec = {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 10, "containers": [container],
            **extra}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def get_pod(kube, namespace: str, name: str) -> dict | None:
    proc = kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def container_status(kube, namespace: str, name: str) -> dict:
    p = get_pod(kube, namespace, name) or {}
    return ((p.get("status") or {}).get("containerStatuses") or [{}])[0]


def ready(kube, namespace: str, name: str) -> dict | None:
    p = get_pod(kube, namespace, name)
    conds = {c["type"]: c["status"] for c in (p or {}).get("status", {}).get("conditions", [])}
    return p if conds.get("Ready") == "True" else None


def http_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)
