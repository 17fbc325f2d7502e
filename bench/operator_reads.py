"""Before/after figures of the operator's API traffic (issue 11: reads from a cache), not a test.

On a running local cluster (`make cluster-up`), runs the operator of a given git revision as a
process (`kopf run`, 5 s resync) in a fresh namespace, applies N simulated resources at once and
prints, from the apiserver's audit log (requests told apart by User-Agent): time until all Healthy,
the requests it took, reads and writes during an idle window (per resource per resync), idle CPU,
peak RSS, and the time from a `kubectl patch` of the spec to the operator's Deployment write.

    .venv/bin/python bench/operator_reads.py --rev 5b3ef1f --ua OpenAPI-Generator   # before
    .venv/bin/python bench/operator_reads.py --rev HEAD --ua autoglm-operator/       # after
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import yaml  # noqa: E402

from tests.cluster.harness import Cluster, build_binaries  # noqa: E402
from tests.operator.test_operator_cluster import simulated  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rev", default="HEAD")  # the operator's source: operator/ at this revision
ap.add_argument("--ua", required=True)  # its User-Agent prefix (main's client said OpenAPI-Generator)
ap.add_argument("-n", type=int, default=50)
ap.add_argument("--idle", type=float, default=30)
ap.add_argument("--changes", type=int, default=10)
a = ap.parse_args()
srcdir = tempfile.mkdtemp(prefix="operator-src-")
subprocess.run(f"git -C {REPO} archive {a.rev} operator | tar -x -C {srcdir}", shell=True, check=True)
a.src = f"{srcdir}/operator"
kubeconfig = Path(os.environ.get("AUTOGLM_TEST_KUBECONFIG") or REPO / ".cache" / "cluster" / "kubeconfig")
kube = Cluster.attach(kubeconfig, build_binaries())
ns = f"m-{uuid.uuid4().hex[:6]}"
kube.kubectl("create", "namespace", ns)
env = {**kube.env, "PYTHONPATH": a.src, "AUTOGLM_OPERATOR_RESYNC_SECONDS": "5"}
log = open(f"{srcdir}/operator.log", "wb")
op = subprocess.Popen(
    [sys.executable, "-m", "kopf", "run", "-m", "autoglm_operator.handlers", "--standalone", "--namespace", ns],
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
)


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def cpu():
    f = open(f"/proc/{op.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def items(kind="autoglmdeployments"):
    return json.loads(kube.kubectl("get", "-n", ns, kind, "-o", "json").stdout)["items"]


try:
    time.sleep(3)
    t0 = time.time()
    kube.kubectl(
        "apply", "-n", ns, "-f", "-", input="---\n".join(yaml.safe_dump(simulated(f"r-{i:03d}")) for i in range(a.n))
    )
    while True:
        h = [
            i
            for i in items()
            if (i.get("status") or {}).get("phase") == "Healthy"
            and i["status"].get("observedGeneration") == i["metadata"]["generation"]
        ]
        if len(h) == a.n:
            break
        if time.time() - t0 > 300:
            raise SystemExit("not all Healthy in 300 s")
        time.sleep(1)
    healthy_s = time.time() - t0
    t_h = time.time()
    time.sleep(6)
    c0, i0 = cpu(), time.time()
    time.sleep(a.idle)
    c1 = cpu()
    reads = kube.audit_reads(since=i0, user_agent=a.ua, namespace=ns)
    writes = kube.audit_writes(since=i0, user_agent=a.ua, namespace=ns)
    kopf_w = kube.audit_writes(since=i0, user_agent="kopf/", namespace=ns)
    resyncs = a.idle / 5

    def verbs(evs):
        out = {}
        for e in evs:
            k = f"{e['verb']} {e['objectRef'].get('resource')}"
            out[k] = out.get(k, 0) + 1
        return out

    # Reaction: change progressDeadlineSeconds of one resource at a time; kubectl's PATCH → operator's Deployment write.
    lat = []
    for i in range(a.changes):
        name = f"r-{i:03d}"
        t = time.time()
        kube.kubectl(
            "patch",
            "-n",
            ns,
            f"agd/{name}",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"rollout": {"progressDeadlineSeconds": 300 + i}}}),
        )
        while True:
            w = [
                e
                for e in kube.audit_writes(since=t - 0.5, namespace=ns)
                if e["objectRef"].get("resource") == "deployments"
                and e["userAgent"].startswith(a.ua)
                and e["objectRef"].get("name", "").startswith(name + "-")
            ]
            p = [
                e
                for e in kube.audit_writes(since=t - 0.5, user_agent="kubectl", namespace=ns)
                if e["objectRef"].get("resource") == "autoglmdeployments"
            ]
            if w and p:
                lat.append(ts(w[0]) - ts(p[0]))
                break
            if time.time() - t > 30:
                lat.append(float("inf"))
                break
            time.sleep(0.1)
    lat.sort()
    hwm = next(int(line.split()[1]) for line in open(f"/proc/{op.pid}/status") if line.startswith("VmHWM")) / 1024
    cold = [
        e
        for e in kube.audit_reads(since=t0, user_agent=a.ua, namespace=ns)
        + kube.audit_writes(since=t0, user_agent=a.ua, namespace=ns)
        if ts(e) <= t_h
    ]
    print(
        json.dumps(
            {
                "src": a.src,
                "n": a.n,
                "all_healthy_s": round(healthy_s, 1),
                "cold_start_requests": len(cold),
                "cold_start_by_verb": verbs(cold),
                "idle_s": a.idle,
                "idle_reads": len(reads),
                "reads_per_resync_per_resource": round(len(reads) / resyncs / a.n, 2),
                "idle_reads_by_verb": verbs(reads),
                "idle_writes": len(writes),
                "idle_writes_kopf": len(kopf_w),
                "idle_cpu_s": round(c1 - c0, 2),
                "peak_rss_mib": round(hwm),
                "reaction_p50_ms": round(statistics.median(lat) * 1000),
                "reaction_max_ms": round(lat[-1] * 1000),
            },
            indent=1,
        )
    )
finally:
    op.terminate()
    op.wait(15)
    kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
