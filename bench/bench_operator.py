"""Operator benchmark on the local control plane (`make bench-operator`).

Starts a fresh cluster, installs the CRD, runs `autoglm-operator` as a process, applies N
AutoGLMDeployments and measures, from the apiserver's audit log (request timestamps, not polling):

- apply → Deployment created latency (CR create to the revision Deployment's create), p50/p90/max;
- apply → Healthy for all N (wall clock);
- write requests during an idle window once everything is Healthy (every client, by User-Agent).

    .venv/bin/python bench/bench_operator.py [--count 20] [--idle-seconds 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.harness import Cluster  # noqa: E402

CR = """\
apiVersion: autoglm.io/v1alpha1
kind: AutoGLMDeployment
metadata: {{name: {name}}}
spec:
  model: {{uri: "file:///models/tiny", dtype: float32, maxModelLen: 512}}
  runtime: {{image: registry.example.com/autoglm/runtime, version: "0.1.0"}}
  resources: {{gpus: 0, cpu: "1", memory: 2Gi}}
  replicas: 1
  # Simulated pods (kwok-cpu-0): the benchmark measures the operator, not hundreds of real runtimes.
  nodeSelector: {{kubernetes.io/hostname: kwok-cpu-0}}
  tolerations: [{{key: autoglm.io/simulated, operator: Exists, effect: NoSchedule}}]
"""


def ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with Cluster.start() as kube:
        kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        kube.kubectl("wait", "--for=condition=Established", "crd/autoglmdeployments.autoglm.io", "--timeout=60s")
        ns = "bench"
        kube.kubectl("create", "namespace", ns)
        log = open(kube.dir / "operator.log", "wb")
        op = subprocess.Popen([str(REPO / ".venv" / "bin" / "autoglm-operator")], env=kube.env,
                              stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(3)  # let the operator list and watch before the burst (its start-up is not measured)
            t0 = time.time()
            manifest = "---\n".join(CR.format(name=f"m{i:03d}") for i in range(args.count))
            kube.kubectl("apply", "-n", ns, "-f", "-", input=manifest)

            def healthy() -> int:
                items = json.loads(kube.kubectl("get", "agd", "-n", ns, "-o", "json").stdout)["items"]
                return sum(1 for i in items if i.get("status", {}).get("phase") == "Healthy")

            deadline = time.time() + 300
            while healthy() < args.count:
                if time.time() > deadline or op.poll() is not None:
                    keep = REPO / ".cache" / "bench-operator.log"
                    keep.write_bytes((kube.dir / "operator.log").read_bytes())
                    print(f"operator did not make every resource Healthy ({healthy()}/{args.count}); log: {keep}")
                    return 1
                time.sleep(0.2)
            all_healthy = time.time() - t0

            writes = kube.audit_writes(since=t0 - 1, namespace=ns)
            cr_created = {w["objectRef"]["name"]: ts(w) for w in writes
                          if w["verb"] == "create" and w["objectRef"]["resource"] == "autoglmdeployments"}
            dep_created = {}
            for w in writes:
                if w["verb"] == "create" and w["objectRef"]["resource"] == "deployments" \
                        and w.get("responseStatus", {}).get("code", 201) < 300:
                    owner = w["objectRef"].get("name", "").rsplit("-", 1)[0]
                    dep_created.setdefault(owner, ts(w))
            latencies = [dep_created[n] - cr_created[n] for n in cr_created if n in dep_created]

            time.sleep(2)  # let the last status writes land before the idle window opens
            idle_start = time.time()
            time.sleep(args.idle_seconds)
            idle = kube.audit_writes(since=idle_start)
            idle_by_agent = Counter(w.get("userAgent", "?").split(" ")[0] for w in idle)
            idle_ns = [w for w in idle if w.get("objectRef", {}).get("namespace") == ns]
        finally:
            op.terminate()
            op.wait(timeout=30)

    result = {
        "count": args.count,
        "apply_to_deployment_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "apply_to_deployment_p90_s": round(pct(latencies, 0.9), 3) if latencies else None,
        "apply_to_deployment_max_s": round(max(latencies), 3) if latencies else None,
        "deployments_seen": len(latencies),
        "apply_to_all_healthy_s": round(all_healthy, 2),
        "idle_seconds": args.idle_seconds,
        "idle_writes_in_namespace": len(idle_ns),
        "idle_writes_cluster_wide_by_agent": dict(idle_by_agent),
    }
    print(f"{'resources':32} {args.count}")
    print(f"{'apply→Deployment p50 / p90 / max':32} {result['apply_to_deployment_p50_s']} / "
          f"{result['apply_to_deployment_p90_s']} / {result['apply_to_deployment_max_s']} s")
    print(f"{'apply→all Healthy':32} {result['apply_to_all_healthy_s']} s")
    print(f"{'writes in namespace, idle':32} {len(idle_ns)} in {args.idle_seconds:.0f} s")
    print(f"{'writes cluster-wide, idle':32} {dict(idle_by_agent)}  (node leases/heartbeats are kwok's)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
