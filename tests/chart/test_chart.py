"""The Helm chart: lints, installs on the local cluster, and its RBAC is enough for the operator
and no more (the operator runs with the chart's ServiceAccount token and reconciles a resource); its
operator pod runs on the process node and reconciles a resource from inside the cluster."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap

import pytest

from autoglm_operator import builders
from devcluster import OPERATOR_IMAGE, RUNTIME_IMAGE
from tests.conftest import REPO
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "autoglm"


def test_chart_lints(kube):
    out = kube.helm("lint", str(CHART), "--strict").stdout
    assert "0 chart(s) failed" in out



def test_rendered_operator_pod_is_hardened(kube):
    docs = kube.helm("template", "agl", str(CHART), "-n", "autoglm-system").stdout
    dep = next(d for d in _yaml_docs(docs) if d and d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["limits"]["memory"]
    # kopf's liveness endpoint serves both probes (the port is the one --liveness binds).
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert "--liveness=http://0.0.0.0:%d/healthz" % health in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe


def _yaml_docs(text: str):
    import yaml

    return list(yaml.safe_load_all(text))


def _can(kube, sa: str, verb: str, resource: str, ns: str = "default") -> bool:
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = kube.kubectl("auth", "can-i", verb, resource, *extra, "-n", ns, f"--as={sa}", check=False)
    return proc.stdout.strip() == "yes"


def test_install_rbac_is_least_privilege_and_sufficient(kube, namespace, node_models):
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl("apply", "--server-side", "-f", str(kube.bin_dir / "crds"))  # Gateway API (httproutes)
    release = f"agl-{namespace[-5:]}"
    # The operator's own pod is simulated (kwok-cpu-0: no operator image on the process node); what
    # is checked here is its RBAC, then the real operator process runs with its ServiceAccount's token.
    values = kube.dir / f"{release}-values.yaml"
    values.write_text("nodeSelector: {kubernetes.io/hostname: kwok-cpu-0}\n"
                      "tolerations: [{key: autoglm.io/simulated, operator: Exists, effect: NoSchedule}]\n"
                      "replicas: 2\n")  # leader election: its Role is checked too
    kube.helm("install", release, str(CHART), "-n", namespace, "--skip-crds", "--wait", "--timeout", "90s",
              "-f", str(values))
    sa = f"system:serviceaccount:{namespace}:{release}-autoglm"
    dep = json.loads(kube.kubectl("get", "deploy", f"{release}-autoglm", "-n", namespace, "-o", "json").stdout)
    assert dep["status"].get("availableReplicas") == 2

    # patch on the resource itself: only to remove the autoglm.io/promote and /abort annotations once acted on.
    for verb, res in [("create", "deployments.apps"), ("delete", "horizontalpodautoscalers.autoscaling"),
                      ("patch", "autoglmdeployments.autoglm.io/status"), ("get", "secrets"), ("watch", "pods"),
                      ("patch", "autoglmdeployments.autoglm.io"), ("create", "httproutes.gateway.networking.k8s.io")]:
        assert _can(kube, sa, verb, res), f"{sa} should be allowed to {verb} {res}"
    for verb, res in [("list", "secrets"), ("watch", "secrets"), ("delete", "pods"), ("create", "pods"),
                      ("update", "autoglmdeployments.autoglm.io"), ("delete", "autoglmdeployments.autoglm.io"),
                      ("create", "clusterroles.rbac.authorization.k8s.io"), ("delete", "nodes"),
                      ("create", "customresourcedefinitions.apiextensions.k8s.io")]:
        assert not _can(kube, sa, verb, res), f"{sa} must not be allowed to {verb} {res}"

    # Sufficient: run the real operator with the ServiceAccount's token and reconcile a resource.
    token = kube.kubectl("create", "token", f"{release}-autoglm", "-n", namespace, "--duration=1h").stdout.strip()
    ca = base64.b64encode((kube.kubeconfig.parent / "pki" / "ca.crt").read_bytes()).decode() \
        if (kube.kubeconfig.parent / "pki" / "ca.crt").exists() else None
    server = json.loads(kube.kubectl("config", "view", "--minify", "--raw", "-o", "json").stdout)[
        "clusters"][0]["cluster"]
    sa_kubeconfig = kube.dir / f"{release}.kubeconfig"
    sa_kubeconfig.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters: [{{name: c, cluster: {{server: "{server['server']}", {'certificate-authority-data: "' + ca + '"' if ca else 'insecure-skip-tls-verify: true'}}}}}]
        users: [{{name: sa, user: {{token: "{token}"}}}}]
        contexts: [{{name: c, context: {{cluster: c, user: sa}}}}]
        current-context: c
        """))
    env = {**kube.env, "KUBECONFIG": str(sa_kubeconfig), "AUTOGLM_OPERATOR_METRICS_PORT": "0",
           **{e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
              if e["name"].startswith("AUTOGLM_OPERATOR_LEADER_ELECTION")}}
    assert env["AUTOGLM_OPERATOR_LEADER_ELECTION"] == "true"
    log = open(kube.dir / f"{release}-operator.log", "wb")
    op = subprocess.Popen([str(REPO / ".venv" / "bin" / "autoglm-operator"), "--namespace", namespace],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "tiny-cpu.yaml"))

        def phase():
            return json.loads(kube.kubectl("get", "agd", "tiny", "-n", namespace, "-o", "json").stdout
                              ).get("status", {}).get("phase")

        wait_for(lambda: phase() == "Healthy", timeout=90,
                 message=f"tiny Healthy under the chart's RBAC (log: {kube.dir}/{release}-operator.log)")
        forbidden = (kube.dir / f"{release}-operator.log").read_text()
        assert "403" not in forbidden and "Forbidden" not in forbidden, forbidden[-2000:]
        assert f"Became the leader: Lease {namespace}/{release}-autoglm" in forbidden, forbidden[-2000:]
    finally:
        op.terminate()
        op.wait(timeout=30)
        kube.helm("uninstall", release, "-n", namespace, check=False)


def test_the_charts_operator_pod_runs_on_proc_0_and_reconciles_from_inside_the_cluster(kube, namespace, node_models):
    """The chart as a user installs it, its operator image mapped to this checkout's operator: the pod
    lands on proc-0, logs in with its projected ServiceAccount token through the `kubernetes` Service,
    and its reconcile makes the model pod Healthy (the writes audited as the ServiceAccount's)."""
    import time

    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl("apply", "--server-side", "-f", str(kube.bin_dir / "crds"))  # Gateway API (httproutes)
    release = f"inpod-{namespace[-5:]}"
    values = kube.dir / f"{release}-values.yaml"
    values.write_text(f"image: {{repository: {OPERATOR_IMAGE}, tag: local}}\n"
                      f"defaultRuntime: {{image: {RUNTIME_IMAGE}}}\n"
                      f"watchNamespaces: [{namespace}]\n"
                      "prometheusAddress: http://prometheus.monitoring:9090\n")
    t0 = time.time()
    try:
        kube.helm("install", release, str(CHART), "-n", namespace, "--skip-crds", "--wait", "--timeout", "120s",
                  "-f", str(values), timeout=150)
        pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l",
                                       "app.kubernetes.io/name=autoglm-operator", "-o", "json").stdout)["items"]
        assert [p["spec"]["nodeName"] for p in pods] == ["proc-0"]
        op_pod = pods[0]["metadata"]["name"]
        kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "tiny-cpu.yaml"))

        def phase():
            return json.loads(kube.kubectl("get", "agd", "tiny", "-n", namespace, "-o", "json").stdout
                              ).get("status", {}).get("phase")

        wait_for(lambda: phase() == "Healthy", timeout=120,
                 message=f"tiny Healthy, reconciled by the operator pod (log: "
                         f"{kube.pod_log(namespace, op_pod, 'operator')[-3000:]})")
        sa = f"system:serviceaccount:{namespace}:{release}-autoglm"
        writes = [(e["verb"], e["objectRef"]["resource"]) for e in kube.audit_writes(since=t0, namespace=namespace)
                  if e["user"]["username"] == sa]
        assert ("create", "deployments") in writes or ("patch", "deployments") in writes, writes
        log = kube.pod_log(namespace, op_pod, "operator")
        assert "Forbidden" not in log, log[-2000:]
    finally:
        kube.helm("uninstall", release, "-n", namespace, "--wait", check=False)


# ---------------------------------------------------------------- values.schema.json, with the real helm


@pytest.mark.parametrize(("args", "named"), [
    (["--set", "imag.tag=v1"], "additional properties 'imag' not allowed"),             # a typo'd key
    (["--set", "resyncSeconds=fast"], "/resyncSeconds': got string, want number"),      # a wrong type
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy': value must be one of"),  # a bad enum
    (["--set", "monitoring.runtime.kind=Probe"], "/monitoring/runtime/kind': value must be one of"),
    (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0'"),
    (["--set", "metrics.serviceMonitor.enable=true"], "additional properties 'enable' not allowed"),
    (["--set", "replicas=0"], "/replicas'"),
])
def test_bad_values_fail_install_and_template_with_the_field_named(kube, namespace, args, named):
    for cmd in (["template", "bad", str(CHART)], ["install", f"bad-{namespace[-5:]}", str(CHART), "-n", namespace]):
        proc = kube.helm(*cmd, *args, check=False)
        assert proc.returncode != 0, f"helm {cmd[0]} {args} should fail"
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
        assert named in proc.stderr, proc.stderr
    assert kube.helm("list", "-n", namespace, "-q").stdout.strip() == ""


def test_good_values_pass_the_schema(kube):
    values = kube.dir / "good-values.yaml"
    values.write_text(textwrap.dedent("""\
        image: {repository: example.org/op, tag: "1.2.3", pullPolicy: Always}
        imagePullSecrets: [{name: regcred}]
        watchNamespaces: [team-a, team-b]
        defaultRuntime: {image: example.org/runtime, version: 0.2.0-rc.1}
        prometheusAddress: http://prometheus.monitoring:9090
        prometheusAdapterRule: {enabled: true}
        resyncSeconds: 120.5
        extraEnv: [{name: AUTOGLM_OPERATOR_API_THREADS, value: "8"}]
        serviceAccount: {create: false, name: op, annotations: {a: b}}
        resources: {requests: {cpu: 1, memory: 1Gi}, limits: {memory: 2Gi}}
        tolerations: [{key: k, operator: Exists}]
        monitoring:
          runtime: {enabled: true, kind: PodMonitor, interval: 1m30s, labels: {release: prom}}
        metrics: {port: 9100, serviceMonitor: {enabled: true, interval: 30s, labels: {release: prom}}}
        replicas: 2
        """))
    kinds = [d["kind"] for d in _yaml_docs(kube.helm("template", "good", str(CHART), "-f", str(values)).stdout) if d]
    assert {"ServiceMonitor", "PodMonitor", "ConfigMap", "Deployment", "Service", "Role", "RoleBinding"} <= set(kinds)
    assert "0 chart(s) failed" in kube.helm("lint", str(CHART), "--strict", "-f", str(values)).stdout


# ---------------------------------------------------------------- ServiceMonitor / PodMonitor


@pytest.fixture(scope="module")
def prometheus_operator_crds(kube):
    """The Prometheus Operator's PodMonitor and ServiceMonitor CRDs, from its Go module, applied."""
    folder = subprocess.run(["bash", str(REPO / "scripts" / "prometheus-operator-crds.sh")], check=True,
                            capture_output=True, text=True).stdout.strip().splitlines()[-1]
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", folder)
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 "crd/podmonitors.monitoring.coreos.com", "crd/servicemonitors.monitoring.coreos.com")
    return folder


def _contains(stored, rendered, path="") -> list[str]:
    """Fields of ``rendered`` missing or different in ``stored`` (the apiserver adds defaults, so
    ``stored`` may have more; a pruned unknown field shows up here)."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [path]
        return [p for k, v in rendered.items() for p in _contains(stored.get(k), v, f"{path}.{k}")]
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [path]
        return [p for i, (s, r) in enumerate(zip(stored, rendered, strict=True)) for p in _contains(s, r, f"{path}[{i}]")]
    return [] if stored == rendered else [path]


SIMULATED_OPERATOR_POD = ("nodeSelector: {kubernetes.io/hostname: kwok-cpu-0}\n"
                          "tolerations: [{key: autoglm.io/simulated, operator: Exists, effect: NoSchedule}]\n")


@pytest.mark.parametrize("kind", ["PodMonitor", "ServiceMonitor"])
def test_monitors_are_accepted_by_the_prometheus_operator_crds(kube, namespace, prometheus_operator_crds, kind):
    release = f"mon-{namespace[-5:]}"
    values = kube.dir / f"{release}-values.yaml"
    values.write_text(SIMULATED_OPERATOR_POD + f"watchNamespaces: [{namespace}]\n"
                      f"monitoring: {{runtime: {{enabled: true, kind: {kind}, labels: {{release: prom}}}}}}\n"
                      "metrics: {serviceMonitor: {enabled: true}}\n")
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in _yaml_docs(
        kube.helm("template", release, str(CHART), "-n", namespace, "-f", str(values)).stdout)
        if d and d["apiVersion"] == "monitoring.coreos.com/v1"}
    assert set(rendered) == {(kind, f"{release}-autoglm-runtime"), ("ServiceMonitor", f"{release}-autoglm-operator")}
    try:
        kube.helm("install", release, str(CHART), "-n", namespace, "--skip-crds", "-f", str(values))
        for (k, name), want in rendered.items():
            got = json.loads(kube.kubectl("get", k.lower(), name, "-n", namespace, "-o", "json").stdout)
            assert _contains(got["spec"], want["spec"]) == [], f"{k} {name}: fields dropped or changed"
            if name.endswith("-runtime"):
                assert got["metadata"]["labels"]["release"] == "prom"
        runtime = rendered[(kind, f"{release}-autoglm-runtime")]["spec"]
        endpoint = (runtime.get("podMetricsEndpoints") or runtime["endpoints"])[0]
        assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
        # The selector matches the labels the operator puts on model pods and Services (one source).
        assert runtime["selector"]["matchLabels"].items() <= builders.common_labels("any").items()
        assert runtime["namespaceSelector"] == {"matchNames": [namespace]}
        dep = json.loads(kube.kubectl("get", "deploy", f"{release}-autoglm", "-n", namespace, "-o", "json").stdout)
        ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"health", "metrics"}
    finally:
        kube.helm("uninstall", release, "-n", namespace, check=False)


def test_the_monitor_check_catches_a_field_the_crd_does_not_know(kube, namespace, prometheus_operator_crds):
    """Control for the test above: a misspelt field is refused by strict validation against the CRD."""
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
           "metadata": {"name": "bad", "namespace": namespace},
           "spec": {"selector": {}, "podMetricsEndpoints": [{"prot": "http"}]}}
    proc = kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=json.dumps(bad),
                        check=False)
    assert proc.returncode != 0 and "prot" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- NOTES, upgrade across a CRD change


def test_install_prints_next_steps_and_upgrade_across_a_crd_change_keeps_everything(kube, namespace, tmp_path):
    """The procedure in docs/how-to/helm.md: `helm upgrade` leaves the CRD alone, `kubectl apply --server-side
    --force-conflicts -f crds/` updates it; the release's objects and an AutoGLMDeployment survive."""
    import shutil

    chart = tmp_path / "autoglm"
    shutil.copytree(CHART, chart)
    release = f"up-{namespace[-5:]}"
    values = kube.dir / f"{release}-values.yaml"
    values.write_text(SIMULATED_OPERATOR_POD)
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    try:
        notes = kube.helm("install", release, str(chart), "-n", namespace, "-f", str(values)).stdout
        for step in ("kubectl apply -f examples/tiny-cpu.yaml", "kubectl get agd",
                     "kubectl apply --server-side --force-conflicts -f crds/", "--reset-then-reuse-values"):
            assert step in notes, notes
        assert "CRD is not in the cluster" not in notes, notes
        kube.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "tiny-cpu.yaml"))
        before = json.loads(kube.kubectl("get", "deploy,sa,agd", "-n", namespace, "-o", "json").stdout)["items"]

        # A new chart version whose CRD changed (a printer column's description) and a changed value.
        crd_file = chart / "crds" / "autoglm.io_autoglmdeployments.yaml"
        old = "description: Pending, Progressing, Healthy, ScaledToZero or Degraded."
        assert old in crd_file.read_text()
        crd_file.write_text(crd_file.read_text().replace(old, old[:-1] + " (upgraded)."))

        def phase_column() -> str:
            crd = json.loads(kube.kubectl("get", "crd", "autoglmdeployments.autoglm.io", "-o", "json").stdout)
            cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            return next(c["description"] for c in cols if c["name"] == "Phase")

        kube.helm("upgrade", release, str(chart), "-n", namespace, "--reset-then-reuse-values",
                  "--set", "resyncSeconds=120")
        assert "(upgraded)" not in phase_column(), "helm upgrade is not expected to touch the CRD"
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(chart / "crds"))
        assert "(upgraded)" in phase_column()

        after = json.loads(kube.kubectl("get", "deploy,sa,agd", "-n", namespace, "-o", "json").stdout)["items"]
        assert {(o["kind"], o["metadata"]["name"], o["metadata"]["uid"]) for o in before} <= \
            {(o["kind"], o["metadata"]["name"], o["metadata"]["uid"]) for o in after}
        dep = json.loads(kube.kubectl("get", "deploy", f"{release}-autoglm", "-n", namespace, "-o", "json").stdout)
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["AUTOGLM_OPERATOR_RESYNC_SECONDS"] == "120"
        # The install's own values are kept (the operator pod stays on the simulated node).
        assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "kwok-cpu-0"}
        assert kube.helm("history", release, "-n", namespace, "-o", "json").stdout.count('"revision"') == 2
    finally:
        kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        kube.helm("uninstall", release, "-n", namespace, check=False)


def test_operator_pod_is_admitted_under_pod_security_restricted(kube, namespace):
    """The chart's own Deployment in a namespace enforcing the "restricted" profile (the apiserver
    refuses a non-compliant pod at creation: the ReplicaSet would report FailedCreate)."""
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/enforce-version=latest")
    release = f"psa-{namespace[-5:]}"
    values = kube.dir / f"{release}-values.yaml"
    values.write_text(SIMULATED_OPERATOR_POD)
    try:
        kube.helm("install", release, str(CHART), "-n", namespace, "--skip-crds", "--wait", "--timeout", "60s",
                  "-f", str(values))
        pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-l",
                                       "app.kubernetes.io/name=autoglm-operator", "-o", "json").stdout)["items"]
        assert len(pods) == 1
    finally:
        kube.helm("uninstall", release, "-n", namespace, check=False)


def test_dashboard_configmap_carries_the_generated_dashboard(kube):
    import yaml

    out = kube.helm("template", "agl", str(CHART), "--set", "dashboard.enabled=true", "--set",
                    "dashboard.namespace=monitoring", "--show-only", "templates/dashboard.yaml").stdout
    cm = yaml.safe_load(out)
    assert cm["metadata"]["namespace"] == "monitoring" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "autoglm-endpoints.json").read_text()
    assert json.loads(cm["data"]["autoglm-endpoints.json"]) == json.loads(shipped)
    assert "templates/dashboard.yaml" not in kube.helm("template", "agl", str(CHART)).stdout  # off by default
