"""Render the key panels of the shipped Grafana dashboard from live data (`make dashboard-png`).

Starts a local cluster (or reuses one: `--kubeconfig .cache/cluster/kubeconfig`), runs the
operator, applies the tiny model with 2 replicas and streams chat completions through its Service
for `--seconds`, then asks Prometheus for each key panel's PromQL exactly as the dashboard has it
(over the load's time range) and draws them with matplotlib into `--png` (default docs/dashboard.png).

    .venv/bin/python bench/render_dashboard.py [--seconds 90] [--kubeconfig PATH] [--png out.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoglm_operator import dashboard  # noqa: E402
from devcluster import Cluster, build_binaries  # noqa: E402
from tests.e2e.test_dashboard_live import concrete  # noqa: E402
from tests.e2e.test_runtime_pods import Load, tiny  # noqa: E402

KEY_PANELS = ["Requests per second by revision", "Time to first token", "Requests waiting per pod (queue depth)",
              "Generated tokens per second"]


def query_range(prom: str, promql: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": 2})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{q}", timeout=30) as resp:
        return json.load(resp)["data"]["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--kubeconfig", type=Path)
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "dashboard.png")
    args = ap.parse_args()
    import yaml

    with contextlib.ExitStack() as stack:
        kube = Cluster.attach(args.kubeconfig, build_binaries()) if args.kubeconfig else stack.enter_context(
            Cluster.start())
        kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        kube.kubectl("wait", "--for=condition=Established", "crd/autoglmdeployments.autoglm.io", "--timeout=60s")
        if not (kube.models_dir / "tiny" / "config.json").exists():
            subprocess.run([str(REPO / ".venv" / "bin" / "autoglm-runtime"), "make-model", "--size", "tiny", "--out",
                            str(kube.models_dir / "tiny")], check=True, capture_output=True)
        ns = f"dash-{int(time.time())}"
        kube.kubectl("create", "namespace", ns)
        op = subprocess.Popen([str(REPO / ".venv" / "bin" / "autoglm-operator"), "--namespace", ns],
                              stdout=open(kube.dir / "dashboard-operator.log", "wb"), stderr=subprocess.STDOUT,
                              env={**kube.env, "AUTOGLM_OPERATOR_RESYNC_SECONDS": "5"})
        stack.callback(op.terminate)
        kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(tiny(replicas=2)))
        deadline = time.monotonic() + 300
        while kube.kubectl("get", "agd", "tiny", "-n", ns, "-o", "jsonpath={.status.phase}").stdout != "Healthy":
            if time.monotonic() > deadline:
                raise SystemExit("tiny never turned Healthy")
            time.sleep(1)
        ip = kube.kubectl("get", "svc", "tiny", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
        start = time.time()
        with Load(f"http://{ip}:8000/v1", "tiny", n=10, max_tokens=32) as load:
            time.sleep(args.seconds)
        end = time.time()
        time.sleep(3)
        panels = {p["title"]: p for p in dashboard.build()["panels"]}
        results = {t: [(tg["legendFormat"], query_range(kube.prometheus_url, concrete(tg["expr"], ns, "tiny"), start, end))
                       for tg in panels[t]["targets"]] for t in KEY_PANELS}
        kube.kubectl("delete", "namespace", ns, "--wait=false")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for ax, title in zip(axes.flat, KEY_PANELS, strict=True):
        for legend, series in results[title]:
            for s in series:
                label = legend.replace("{{revision}}", s["metric"].get("revision", "")).replace(
                    "{{pod}}", s["metric"].get("pod", "")[-5:])
                xs = [float(v[0]) - start for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                ax.plot(xs, ys, label=label)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
    fig.suptitle(f"autoglm dashboard, live: tiny model, 2 pods, 10 streaming clients ({load.ok} requests, "
                 f"{len(load.failed)} failed)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"{load.ok} requests ok, {len(load.failed)} failed; plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
