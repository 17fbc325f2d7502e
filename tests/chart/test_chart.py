"""The Helm chart: lints, installs on the local cluster, and its RBAC is enough for the operator
and no more (the operator runs with the chart's ServiceAccount token and reconciles a resource)."""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap

import pytest

from tests.conftest import REPO
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "autoglm"


def test_chart_lints(kube):
    out = kube.helm("lint", str(CHART), "--strict").stdout
    assert "0 chart(s) failed" in out


def test_chart_ships_the_crd_from_crds_folder():
    assert (CHART / "crds" / "autoglm.io_autoglmdeployments.yaml").read_text() == \
        (REPO / "crds" / "autoglm.io_autoglmdeployments.yaml").read_text()


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
    release = f"agl-{namespace[-5:]}"
    # The operator's own pod is simulated (kwok-cpu-0: no operator image on the process node); what
    # is checked here is its RBAC, then the real operator process runs with its ServiceAccount's token.
    values = kube.dir / f"{release}-values.yaml"
    values.write_text("nodeSelector: {kubernetes.io/hostname: kwok-cpu-0}\n"
                      "tolerations: [{key: autoglm.io/simulated, operator: Exists, effect: NoSchedule}]\n")
    kube.helm("install", release, str(CHART), "-n", namespace, "--skip-crds", "--wait", "--timeout", "90s",
              "-f", str(values))
    sa = f"system:serviceaccount:{namespace}:{release}-autoglm"
    dep = json.loads(kube.kubectl("get", "deploy", f"{release}-autoglm", "-n", namespace, "-o", "json").stdout)
    assert dep["status"].get("availableReplicas") == 1

    for verb, res in [("create", "deployments.apps"), ("delete", "horizontalpodautoscalers.autoscaling"),
                      ("patch", "autoglmdeployments.autoglm.io/status"), ("get", "secrets"), ("watch", "pods")]:
        assert _can(kube, sa, verb, res), f"{sa} should be allowed to {verb} {res}"
    for verb, res in [("list", "secrets"), ("watch", "secrets"), ("delete", "pods"), ("create", "pods"),
                      ("patch", "autoglmdeployments.autoglm.io"), ("delete", "autoglmdeployments.autoglm.io"),
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
    env = {**kube.env, "KUBECONFIG": str(sa_kubeconfig)}
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
    finally:
        op.terminate()
        op.wait(timeout=30)
        kube.helm("uninstall", release, "-n", namespace, check=False)
