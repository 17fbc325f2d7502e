"""The operator against the real local control plane (kwok nodes; pods go Ready without containers).

Each test gets its own namespace and an operator scoped to it: in-process with
``kopf.testing.KopfRunner``, or as the real ``autoglm-operator`` process where it must be killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
LABEL_DEPLOYMENT = "autoglm.io/deployment"
LABEL_REVISION = "autoglm.io/revision"
OPERATOR_UA = "autoglm-operator/"  # kube.py's User-Agent (kopf's own requests say kopf/...)


def agd(name: str, **spec_overrides) -> dict:
    spec = {
        "model": {"name": "glm-tiny", "uri": "file:///models/glm-tiny"},
        "runtime": {"image": "registry.example.com/autoglm/runtime", "version": "0.1.0"},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-A10G", "cpu": "2", "memory": "8Gi"},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment", "metadata": {"name": name},
            "spec": spec}


# ------------------------------------------------------------------ helpers


def get(kube, namespace: str, *what: str) -> dict:
    return json.loads(kube.kubectl("get", "-n", namespace, *what, "-o", "json").stdout)


def try_get(kube, namespace: str, *what: str) -> dict | None:
    proc = kube.kubectl("get", "-n", namespace, *what, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def apply(kube, namespace: str, body: dict) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def merge(kube, namespace: str, what: str, patch: dict) -> None:
    kube.kubectl("patch", "-n", namespace, what, "--type=merge", "-p", json.dumps(patch))


def status(kube, namespace: str, name: str) -> dict:
    return (get(kube, namespace, f"autoglmdeployment/{name}").get("status") or {})


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def deployments(kube, namespace: str, name: str) -> list[dict]:
    return get(kube, namespace, "deployments", "-l", f"{LABEL_DEPLOYMENT}={name}")["items"]


def wait_phase(kube, namespace: str, name: str, phase: str, timeout: float = 60, ready: str | None = None,
               **cond) -> dict:
    """Wait until the status, computed for the current generation, shows ``phase`` (and more)."""
    def check():
        obj = get(kube, namespace, f"autoglmdeployment/{name}")
        st = obj.get("status") or {}
        if st.get("phase") != phase or st.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        if ready is not None and st.get("ready") != ready:
            return None
        for type_, reason in cond.items():
            if condition(st, type_).get("reason") != reason:
                return None
        return st
    return wait_for(check, timeout=timeout, message=f"{name} phase {phase} {cond}")


def simulated(name: str, **spec_overrides) -> dict:
    """A resource whose pods go to the simulated CPU node (kwok-cpu-0): many fit, nothing runs."""
    return agd(name, resources={"gpus": 0, "cpu": "100m", "memory": "128Mi"},
               nodeSelector={"kubernetes.io/hostname": "kwok-cpu-0"},
               tolerations=[{"key": "autoglm.io/simulated", "operator": "Exists", "effect": "NoSchedule"}],
               **spec_overrides)


def operator_requests(kube, since: float, namespace: str) -> tuple[list[dict], list[dict]]:
    """(writes, reads) the operator's own client made (User-Agent autoglm-operator/...), from the audit log."""
    return (kube.audit_writes(since=since, user_agent=OPERATOR_UA, namespace=namespace),
            kube.audit_reads(since=since, user_agent=OPERATOR_UA, namespace=namespace))


def by_verb(events: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in events:
        key = f"{ev['verb']} {ev.get('objectRef', {}).get('resource', '')}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def event_reasons(kube, namespace: str, name: str) -> list[str]:
    items = get(kube, namespace, "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [e["reason"] for e in items]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def crd(kube):
    kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "crd/autoglmdeployments.autoglm.io", "--timeout=60s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def op_env(kube, monkeypatch) -> dict[str, str]:
    # The metrics server on a free loopback port (the default 8081 may be taken on a shared machine).
    # The operator's own identity: its reads are audited (tests count them), the tests' polls are not.
    env = {"KUBECONFIG": str(kube.operator_kubeconfig), "AUTOGLM_OPERATOR_RESYNC_SECONDS": "5",
           "AUTOGLM_OPERATOR_METRICS_PORT": str(free_port()), "AUTOGLM_OPERATOR_METRICS_ADDRESS": "127.0.0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {**kube.env, **env}


@pytest.fixture
def operator(crd, op_env, namespace):
    from kopf.testing import KopfRunner

    args = ["run", "-m", "autoglm_operator.handlers", "--standalone", "--namespace", namespace, "--verbose"]
    with KopfRunner(args, timeout=30) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


@contextmanager
def operator_process(env: dict[str, str], namespace: str, log: Path):
    """The real console script, killable with SIGKILL."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "autoglm-operator"), "--namespace", namespace],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------ tests


def scrape_metrics(port: str) -> dict[str, float]:
    """The operator's /metrics, summed by sample name and the labels given in the key: ``name{k=v}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            for k, v in s.labels.items():
                key = f"{s.name}{{{k}={v}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_apply_ready_get_describe_scale_and_idle(kube, namespace, operator, op_env):
    apply(kube, namespace, agd("chat", replicas=1))
    st = wait_phase(kube, namespace, "chat", "Healthy")
    [dep] = deployments(kube, namespace, "chat")
    rev = dep["metadata"]["labels"][LABEL_REVISION]
    assert dep["metadata"]["name"] == f"chat-{rev}" == st["stableRevision"]
    owner = dep["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "AutoGLMDeployment" and owner["controller"] and owner["blockOwnerDeletion"]
    assert dep["status"]["availableReplicas"] == 1
    pods = get(kube, namespace, "pods", "-l", f"{LABEL_DEPLOYMENT}=chat")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == ["kwok-gpu-0"]
    svc = get(kube, namespace, "service/chat")
    assert svc["spec"]["selector"] == {LABEL_DEPLOYMENT: "chat", LABEL_REVISION: rev}
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8000
    assert st["ready"] == "1/1" and st["endpoint"] == f"http://chat.{namespace}.svc.cluster.local:8000/v1"
    assert condition(st, "Ready")["status"] == "True" and condition(st, "Degraded")["status"] == "False"
    assert try_get(kube, namespace, "pdb/chat") is None and try_get(kube, namespace, "hpa/chat") is None

    table = kube.kubectl("get", "-n", namespace, "agd").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "PHASE", "VERSION", "CANARY", "WEIGHT", "AGE"]
    assert table[1].split()[:5] == ["chat", "1/1", "Healthy", "0.1.0", "0"]  # CANARY is blank
    describe = kube.kubectl("describe", "-n", namespace, "agd/chat").stdout
    for text in ("Stable Revision:", f"chat-{rev}", "ReplicasReady", "RevisionCreated", "Ready"):
        assert text in describe, f"{text!r} missing from kubectl describe:\n{describe}"

    # Scale subresource.
    kube.kubectl("scale", "-n", namespace, "agd/chat", "--replicas=3")
    st = wait_phase(kube, namespace, "chat", "Healthy", timeout=60, ready="3/3")
    assert st["replicas"] == 3 and st["selector"] == f"{LABEL_DEPLOYMENT}=chat"
    assert deployments(kube, namespace, "chat")[0]["spec"]["replicas"] == 3
    assert get(kube, namespace, "pdb/chat")["spec"]["maxUnavailable"] == 1
    assert "ScaledUp" in event_reasons(kube, namespace, "chat")

    # Idle: several resyncs (every 5 s) and nothing is written, counted from the audit log (a no-op
    # PATCH would leave every resourceVersion as it was).
    time.sleep(3)
    t0 = time.time()
    time.sleep(12)
    for agent in (OPERATOR_UA, "kopf/"):
        writes = kube.audit_writes(since=t0, user_agent=agent, namespace=namespace)
        assert writes == [], f"{agent} wrote while idle: {by_verb(writes)}"

    # The operator's own /metrics, scraped from its server.
    m = scrape_metrics(op_env["AUTOGLM_OPERATOR_METRICS_PORT"])
    assert m["autoglm_operator_reconcile_duration_seconds_count"] > 0, m
    assert m["autoglm_operator_api_requests_total{verb=get}"] > 0, m
    assert m["autoglm_operator_api_requests_total{resource=Deployment}"] > 0, m
    assert m["autoglm_operator_resources{phase=Healthy}"] == 1, m
    assert m["autoglm_operator_rollouts_in_progress"] == 0, m


def test_autoscaling_in_place_then_version_rollout(kube, namespace, operator):
    apply(kube, namespace, agd("auto", autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3},
                               rollout={"steps": [{"weight": 50}]}))
    wait_phase(kube, namespace, "auto", "Healthy")
    [dep] = deployments(kube, namespace, "auto")
    hpa = get(kube, namespace, "hpa/auto")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "autoglm_requests_waiting"

    merge(kube, namespace, "agd/auto", {"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 5,
                                                                  "targetCPUUtilization": 70}}})
    wait_for(lambda: get(kube, namespace, "hpa/auto")["spec"]["maxReplicas"] == 5, timeout=30,
             message="HPA patched in place")
    hpa = get(kube, namespace, "hpa/auto")
    assert hpa["spec"]["minReplicas"] == 2 and len(hpa["spec"]["metrics"]) == 2
    assert [d["metadata"]["name"] for d in deployments(kube, namespace, "auto")] == [dep["metadata"]["name"]]

    # New version: a canary at 50 % (one step, no pause), promoted once Ready at full count; the old one goes.
    old_name = dep["metadata"]["name"]
    merge(kube, namespace, "agd/auto", {"spec": {"runtime": {"version": "0.2.0"}}})

    def switched():
        deps = deployments(kube, namespace, "auto")
        st = status(kube, namespace, "auto")
        return (len(deps) == 1 and deps[0]["metadata"]["name"] != old_name and st.get("phase") == "Healthy"
                and st.get("stableVersion") == "0.2.0" and deps[0])
    new = wait_for(switched, timeout=90, message="rollout to 0.2.0")
    new_rev = new["metadata"]["labels"][LABEL_REVISION]
    assert get(kube, namespace, "service/auto")["spec"]["selector"][LABEL_REVISION] == new_rev
    assert get(kube, namespace, "hpa/auto")["spec"]["scaleTargetRef"]["name"] == new["metadata"]["name"]
    reasons = event_reasons(kube, namespace, "auto")
    assert {"RevisionCreated", "CanaryStarted", "Promoted", "RevisionDeleted"} <= set(reasons)
    assert "canaryRevision" not in status(kube, namespace, "auto")


def test_unschedulable_gpu_product_degrades_then_recovers(kube, namespace, operator):
    body = agd("b200")
    body["spec"]["resources"]["gpuProduct"] = "NVIDIA-B200"
    apply(kube, namespace, body)
    st = wait_phase(kube, namespace, "b200", "Degraded", Degraded="Unschedulable")
    assert "nodes are available" in condition(st, "Degraded")["message"]
    assert condition(st, "Ready")["status"] == "False"
    assert "Degraded" in event_reasons(kube, namespace, "b200")

    merge(kube, namespace, "agd/b200", {"spec": {"resources": {"gpuProduct": "NVIDIA-H100-80GB-HBM3"}}})
    st = wait_phase(kube, namespace, "b200", "Healthy", timeout=90)
    assert condition(st, "Degraded")["status"] == "False"
    pods = get(kube, namespace, "pods", "-l", f"{LABEL_DEPLOYMENT}=b200")["items"]
    wait_for(lambda: {p["spec"].get("nodeName") for p in
                      get(kube, namespace, "pods", "-l", f"{LABEL_DEPLOYMENT}=b200")["items"]} == {"kwok-gpu-1"},
             timeout=60, message="only H100 pods remain")
    assert len(deployments(kube, namespace, "b200")) == 1, pods


def test_missing_secret_and_pvc_degrade_then_recover(kube, namespace, operator):
    apply(kube, namespace, agd("keyed", auth={"apiKeySecretRef": {"name": "chat-api-key", "key": "token"}}))
    st = wait_phase(kube, namespace, "keyed", "Degraded", Degraded="SecretNotFound")
    assert "chat-api-key" in condition(st, "Degraded")["message"]
    kube.kubectl("create", "secret", "generic", "chat-api-key", "-n", namespace, "--from-literal=token=s3cret")
    wait_phase(kube, namespace, "keyed", "Healthy", timeout=60)
    [dep] = deployments(kube, namespace, "keyed")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "AUTOGLM_RUNTIME_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "chat-api-key", "key": "token"}}} in env

    apply(kube, namespace, agd("stored", model={"uri": "pvc://model-store/glm-tiny"}))
    st = wait_phase(kube, namespace, "stored", "Degraded", Degraded="PersistentVolumeClaimNotFound")
    assert "model-store" in condition(st, "Degraded")["message"]
    apply(kube, namespace, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "model-store"},
                            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: deployments(kube, namespace, "stored"), timeout=30, message="deployment once the PVC exists")
    st = status(kube, namespace, "stored")
    assert condition(st, "Degraded").get("reason") != "PersistentVolumeClaimNotFound"


def test_delete_garbage_collects_children(kube, namespace, operator):
    apply(kube, namespace, agd("gone", replicas=2))
    wait_phase(kube, namespace, "gone", "Healthy")
    assert try_get(kube, namespace, "pdb/gone") is not None
    kube.kubectl("delete", "-n", namespace, "agd/gone", "--wait=true", "--timeout=30s")

    def all_gone():
        left = get(kube, namespace, "deployments,services,poddisruptionbudgets", "-l", f"{LABEL_DEPLOYMENT}=gone")
        return not left["items"]
    wait_for(all_gone, timeout=60, message="children garbage-collected")


def test_operator_killed_and_restarted_converges(kube, namespace, crd, op_env, tmp_path):
    log = tmp_path / "operator.log"
    apply(kube, namespace, agd("phoenix", replicas=2, rollout={"steps": []}))
    with operator_process(op_env, namespace, log) as proc:
        wait_for(lambda: deployments(kube, namespace, "phoenix"), timeout=60, message="first deployment")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    old = {d["metadata"]["name"] for d in deployments(kube, namespace, "phoenix")}
    merge(kube, namespace, "agd/phoenix", {"spec": {"runtime": {"version": "0.3.0"}, "replicas": 1}})
    with operator_process(op_env, namespace, log):
        def converged():
            st = status(kube, namespace, "phoenix")
            deps = deployments(kube, namespace, "phoenix")
            return (st.get("phase") == "Healthy" and st.get("stableVersion") == "0.3.0" and len(deps) == 1
                    and deps[0]["metadata"]["name"] not in old and st.get("ready") == "1/1")
        wait_for(converged, timeout=90, message=f"converged after restart (log: {log})")
        st = status(kube, namespace, "phoenix")
        assert st["observedGeneration"] == get(kube, namespace, "agd/phoenix")["metadata"]["generation"]
        assert try_get(kube, namespace, "pdb/phoenix") is None


def test_network_policy_is_accepted_and_removed_when_disabled(kube, namespace, operator):
    # The local cluster enforces no NetworkPolicy (no CNI): this checks what the apiserver accepts.
    apply(kube, namespace, agd("np", networkPolicy={"enabled": True, "clientLabels": {"team": "agents"}}))
    pol = wait_for(lambda: try_get(kube, namespace, "networkpolicy/np"), timeout=30, message="NetworkPolicy np")
    assert pol["spec"]["ingress"][0]["from"][0] == {"podSelector": {"matchLabels": {"team": "agents"}}}
    merge(kube, namespace, "autoglmdeployment/np", {"spec": {"networkPolicy": {"enabled": False}}})
    wait_for(lambda: try_get(kube, namespace, "networkpolicy/np") is None, timeout=30, message="NetworkPolicy gone")


def test_fifty_resources_idle_make_no_writes_and_no_reads(kube, namespace, operator):
    """Idle with 50 resources over at least two resyncs (every 5 s): the operator's client sends
    nothing at all, counted from the apiserver's audit log (a no-op PATCH would not bump a
    resourceVersion, so resourceVersions cannot show it; reads are audited for this too)."""
    n = 50
    kube.kubectl("apply", "-n", namespace, "-f", "-",
                 input="---\n".join(yaml.safe_dump(simulated(f"idle-{i:02d}")) for i in range(n)))

    def all_healthy():
        items = get(kube, namespace, "autoglmdeployments")["items"]
        healthy = [i for i in items if (i.get("status") or {}).get("phase") == "Healthy"
                   and i["status"].get("observedGeneration") == i["metadata"]["generation"]]
        return len(healthy) == n
    wait_for(all_healthy, timeout=240, interval=2, message=f"{n} resources Healthy")
    time.sleep(6)  # what the last status writes trigger settles (one resync period)
    t0 = time.time()
    time.sleep(12)  # two resyncs at least
    writes, reads = operator_requests(kube, t0, namespace)
    assert writes == [], f"writes while idle: {by_verb(writes)}"
    assert reads == [], f"reads while idle (a resync must read from the cache): {by_verb(reads)}"
    assert kube.audit_writes(since=t0, user_agent="kopf/", namespace=namespace) == []


def test_a_users_service_and_pdb_are_never_adopted(kube, namespace, operator):
    """Objects of the user's that carry the resource's name: left alone (no ownerReference of ours,
    so not garbage-collected with it); the resource is Degraded with reason ChildConflict."""
    kube.kubectl("create", "service", "clusterip", "web", "-n", namespace, "--tcp=80:8080")
    kube.kubectl("create", "poddisruptionbudget", "web", "-n", namespace, "--selector=app=web", "--min-available=1")
    apply(kube, namespace, agd("web", replicas=2))
    st = wait_phase(kube, namespace, "web", "Degraded", Degraded="ChildConflict")
    assert "Service web" in condition(st, "Degraded")["message"]
    assert "Degraded" in event_reasons(kube, namespace, "web")
    for what in ("service/web", "pdb/web"):
        obj = get(kube, namespace, what, "--show-managed-fields")
        assert not obj["metadata"].get("ownerReferences"), f"{what} adopted: {obj['metadata']}"
        managers = {m["manager"] for m in obj["metadata"].get("managedFields") or []}
        assert "autoglm-operator" not in managers, f"{what} written by the operator: {managers}"
    assert get(kube, namespace, "service/web")["spec"]["selector"] == {"app": "web"}
    # The user's objects survive the resource's deletion (they were never ours).
    kube.kubectl("delete", "-n", namespace, "agd/web", "--wait=true", "--timeout=30s")
    wait_for(lambda: not deployments(kube, namespace, "web"), timeout=60, message="revisions collected")
    assert try_get(kube, namespace, "service/web") is not None and try_get(kube, namespace, "pdb/web") is not None


def test_rollout_restart_survives_a_template_update_and_dropped_fields_are_pruned(kube, namespace, operator):
    apply(kube, namespace, simulated("rr", replicas=1, rollout={"progressDeadlineSeconds": 300}))
    wait_phase(kube, namespace, "rr", "Healthy")
    [dep] = deployments(kube, namespace, "rr")
    name = dep["metadata"]["name"]
    kube.kubectl("rollout", "restart", "-n", namespace, f"deployment/{name}")
    kube.kubectl("label", "-n", namespace, f"deployment/{name}", "team=web")
    stamp = get(kube, namespace, f"deployment/{name}")["spec"]["template"]["metadata"]["annotations"][
        "kubectl.kubernetes.io/restartedAt"]
    # A change of the same revision (not what the pods run): the Deployment is updated in place.
    merge(kube, namespace, "agd/rr", {"spec": {"rollout": {"progressDeadlineSeconds": 400}}})
    wait_for(lambda: get(kube, namespace, f"deployment/{name}")["spec"]["progressDeadlineSeconds"] == 400,
             timeout=30, message="Deployment updated in place")
    d = get(kube, namespace, f"deployment/{name}", "--show-managed-fields")
    assert d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == stamp
    assert d["metadata"]["labels"]["team"] == "web"
    # Every field we own is in our one server-side-apply set, so what we stop sending is pruned.
    managed = [m for m in d["metadata"]["managedFields"] if m["manager"] == "autoglm-operator"]
    assert {m["operation"] for m in managed} == {"Apply"}, managed
    wait_phase(kube, namespace, "rr", "Healthy")
