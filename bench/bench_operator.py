"""Operator scale benchmark on the local control plane (`make bench-operator`).

For each N: a fresh cluster, the CRD, ``autoglm-operator`` as its own process (with its own client
identity, whose reads and writes the apiserver audits), then N AutoGLMDeployments across 10
namespaces created at once (one ``kubectl create`` per namespace, in parallel). Measured, from the
apiserver's audit log (request timestamps) and the operator's /proc:

- time until all N are Ready (``status.phase`` Healthy or the Ready condition True; polled every 2 s);
- apply → Deployment created, p50/p99 (the CR's create to its first Deployment's create);
- the operator's CPU seconds (utime+stime) and peak RSS (VmHWM);
- the operator's API requests by verb, from the first create until all Ready;
- writes and reads (get/list/watch requests started) during an idle window; writes to the
  leader-election object (``kopfpeerings``/``leases`` named ``autoglm-operator``) are excluded by name
  and reported apart;
- reaction to one spec change with N present: 20 CRs patched one by one (``spec.replicas``),
  CR patch → the operator's write to its Deployment, p50/p99.

    .venv/bin/python bench/bench_operator.py [--counts 100,500,1000] [--idle-seconds 120] [--json out.json]
        [--leader-election] [--operator-path OTHER_CHECKOUT/operator]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devcluster import OPERATOR_USER, WRITE_VERBS, Cluster  # noqa: E402

NAMESPACES = 10
LEADER_OBJECT = "autoglm-operator"  # the leader-election object's name (chart and tests/operator/test_ha.py)
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


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 3)


class Audit:
    """The audit log read incrementally (it grows to hundreds of MB at N = 1,000): one compact
    record per request (first stage seen), ``(ts, verb, user, resource, subresource, ns, name, code)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[tuple] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def refresh(self) -> list[tuple]:
        with self._lock:
            if not self.path.exists():
                return self.events
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # leave a half-written line for next time
            self.offset += end
            for line in data[:end].splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                aid = ev.get("auditID")
                if aid in self._seen:
                    continue
                self._seen.add(aid)
                ref = ev.get("objectRef") or {}
                ts = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
                self.events.append((ts, ev.get("verb"), (ev.get("user") or {}).get("username", ""),
                                    ref.get("resource", ""), ref.get("subresource", ""), ref.get("namespace", ""),
                                    ref.get("name", ""), (ev.get("responseStatus") or {}).get("code", 0)))
            return self.events

    def between(self, t0: float, t1: float = float("inf")) -> list[tuple]:
        return [e for e in self.refresh() if t0 <= e[0] < t1]


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds = utime+stime, peak RSS MiB = VmHWM) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return cpu, hwm / 1024


def is_leader_object(e: tuple) -> bool:
    return e[3] in ("kopfpeerings", "clusterkopfpeerings", "leases") and e[6] == LEADER_OBJECT


def ready_count(kube: Cluster) -> int:
    out = kube.kubectl("get", "agd", "-A", "-o", "jsonpath={range .items[*]}{.status.phase}"
                       "{'|'}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}", timeout=120).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Healthy|") or line.endswith("|True"))


def run_one(n: int, args: argparse.Namespace) -> dict:
    with Cluster.start() as kube:
        audit = Audit(kube.dir / "audit.log")
        kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        kube.kubectl("wait", "--for=condition=Established", "crd/autoglmdeployments.autoglm.io", "--timeout=60s")
        namespaces = [f"bench-{i}" for i in range(NAMESPACES)]
        kube.kubectl("create", "-f", "-", input="---\n".join(
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n" for ns in namespaces))
        env = {**kube.env, "KUBECONFIG": str(kube.operator_kubeconfig),
               "AUTOGLM_OPERATOR_RESYNC_SECONDS": str(args.resync_seconds), "AUTOGLM_OPERATOR_METRICS_PORT": "0"}
        if args.leader_election:  # one replica holding the Lease: its renewals are counted apart
            env.update(AUTOGLM_OPERATOR_LEADER_ELECTION="true", AUTOGLM_OPERATOR_LEADER_ELECTION_NAMESPACE="default",
                       AUTOGLM_OPERATOR_LEADER_ELECTION_NAME=LEADER_OBJECT)
        if args.operator_path:
            env["PYTHONPATH"] = f"{args.operator_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
        log = open(kube.dir / "operator.log", "wb")
        op = subprocess.Popen([sys.executable, "-m", "autoglm_operator.main"], env=env, cwd=kube.dir,
                              stdout=log, stderr=subprocess.STDOUT)
        result: dict = {"count": n, "namespaces": NAMESPACES}
        try:
            deadline = time.time() + 60
            while b"Started autoglm-operator" not in (kube.dir / "operator.log").read_bytes():
                if time.time() > deadline or op.poll() is not None:
                    raise SystemExit(f"the operator did not start; log: {kube.dir / 'operator.log'}")
                time.sleep(0.2)
            time.sleep(2)  # its watches are up (start-up is not measured)
            cpu0, _ = proc_stats(op.pid)

            # ---- burst: N resources across the namespaces, created at once
            per_ns = {ns: [f"m{i:04d}" for i in range(n) if i % NAMESPACES == k] for k, ns in enumerate(namespaces)}
            t0 = time.time()

            def create(ns: str) -> None:
                kube.kubectl("create", "-n", ns, "-f", "-", timeout=600,
                             input="---\n".join(CR.format(name=name) for name in per_ns[ns]))

            with ThreadPoolExecutor(NAMESPACES) as pool:
                list(pool.map(create, namespaces))
            applied = time.time()
            ready = 0
            deadline = t0 + args.ready_timeout
            while True:
                ready = ready_count(kube)
                if ready >= n or time.time() > deadline or op.poll() is not None:
                    break
                time.sleep(2)
            t_ready = time.time()
            cpu1, rss1 = proc_stats(op.pid) if op.poll() is None else (float("nan"), float("nan"))
            burst = audit.between(t0 - 1, t_ready)
            crs = {(e[5], e[6]): e[0] for e in burst if e[1] == "create" and e[3] == "autoglmdeployments"}
            deps: dict[tuple[str, str], float] = {}
            for e in burst:
                if e[2] == OPERATOR_USER and e[3] == "deployments" and e[1] in ("create", "patch") and e[7] == 201:
                    deps.setdefault((e[5], e[6].rsplit("-", 1)[0]), e[0])
            lat = [deps[k] - crs[k] for k in crs if k in deps]
            ops = [e for e in burst if e[2] == OPERATOR_USER]
            result.update({
                "apply_seconds": round(applied - t0, 2),
                "ready": ready,
                "all_ready_s": round(t_ready - t0, 1) if ready >= n else None,
                "apply_to_deployment_p50_s": pct(lat, 0.5),
                "apply_to_deployment_p99_s": pct(lat, 0.99),
                "deployments_created": len(lat),
                "burst_cpu_s": round(cpu1 - cpu0, 1),
                "burst_requests_by_verb": dict(Counter(e[1] for e in ops).most_common()),
                "burst_requests_by_resource": dict(Counter(f"{e[1]} {e[3]}{'/' + e[4] if e[4] else ''}"
                                                           for e in ops).most_common()),
            })
            print(f"N={n}: {ready}/{n} Ready after {t_ready - t0:.1f} s", flush=True)

            # ---- idle: nothing changes
            time.sleep(5)  # the last status writes land before the window opens
            i0 = time.time()
            time.sleep(args.idle_seconds)
            i1 = time.time()
            idle = [e for e in audit.between(i0, i1) if e[2] == OPERATOR_USER]
            idle_writes = [e for e in idle if e[1] in WRITE_VERBS and not is_leader_object(e)]
            idle_reads = [e for e in idle if e[1] in ("get", "list", "watch")]
            result.update({
                "idle_seconds": round(i1 - i0, 1),
                "idle_writes": len(idle_writes),
                "idle_writes_by_resource": dict(Counter(f"{e[1]} {e[3]}{'/' + e[4] if e[4] else ''}"
                                                        for e in idle_writes)),
                "idle_leader_writes": sum(1 for e in idle if e[1] in WRITE_VERBS and is_leader_object(e)),
                "idle_reads_per_s": round(len(idle_reads) / (i1 - i0), 2),
                "idle_reads_by_verb": dict(Counter(e[1] for e in idle_reads)),
            })
            print(f"N={n}: idle {result['idle_writes']} writes, {result['idle_reads_per_s']} reads/s", flush=True)

            # ---- reaction: one spec change at a time, with N present
            reactions: list[float] = []
            missed = 0
            for i in range(args.changes):
                ns = namespaces[i % NAMESPACES]
                name = per_ns[ns][(i // NAMESPACES) % len(per_ns[ns])]
                t_patch = time.time()
                kube.kubectl("patch", "-n", ns, f"agd/{name}", "--type=merge", "-p", '{"spec":{"replicas":2}}')
                found = None
                limit = time.time() + args.change_timeout
                while found is None and time.time() < limit:
                    time.sleep(0.2)
                    evs = audit.between(t_patch - 1)
                    p = next((e[0] for e in evs if e[1] == "patch" and e[3] == "autoglmdeployments"
                              and not e[4] and e[5] == ns and e[6] == name), None)
                    if p is None:
                        continue
                    found = next((e[0] - p for e in evs if e[0] >= p and e[2] == OPERATOR_USER
                                  and e[3] == "deployments" and e[1] in ("update", "patch") and e[5] == ns
                                  and e[6].startswith(name + "-")), None)
                if found is None:
                    missed += 1
                else:
                    reactions.append(found)
            cpu2, rss2 = proc_stats(op.pid) if op.poll() is None else (float("nan"), float("nan"))
            result.update({
                "reaction_p50_s": pct(reactions, 0.5),
                "reaction_p99_s": pct(reactions, 0.99),
                "reaction_missed": missed,
                "cpu_s_total": round(cpu2 - cpu0, 1),
                "peak_rss_mib": round(rss2, 1),
                "operator_alive": op.poll() is None,
            })
        finally:
            op.terminate()
            try:
                op.wait(timeout=30)
            except subprocess.TimeoutExpired:
                op.kill()
                op.wait()
            keep = REPO / ".cache" / f"bench-operator-{n}.log"
            keep.parent.mkdir(exist_ok=True)
            keep.write_bytes((kube.dir / "operator.log").read_bytes())
    return result


ROWS = [
    ("resources (namespaces)", lambda r: f"{r['count']} ({r['namespaces']})"),
    ("Ready within limit", lambda r: f"{r['ready']}/{r['count']}"),
    ("apply → all Ready", lambda r: f"{r['all_ready_s']} s" if r["all_ready_s"] is not None else "not reached"),
    ("apply → Deployment p50 / p99",
     lambda r: f"{r['apply_to_deployment_p50_s']} / {r['apply_to_deployment_p99_s']} s"),
    ("operator CPU, burst / total", lambda r: f"{r['burst_cpu_s']} / {r['cpu_s_total']} s"),
    ("operator peak RSS", lambda r: f"{r['peak_rss_mib']} MiB"),
    ("API requests (burst), by verb", lambda r: " ".join(f"{k}={v}" for k, v in r["burst_requests_by_verb"].items())),
    ("writes while idle", lambda r: f"{r['idle_writes']} in {r['idle_seconds']:.0f} s"
     + (f" (+{r['idle_leader_writes']} to the Lease)" if r["idle_leader_writes"] else "")),
    ("reads while idle", lambda r: f"{r['idle_reads_per_s']} /s"),
    ("spec change → Deployment p50 / p99",
     lambda r: f"{r['reaction_p50_s']} / {r['reaction_p99_s']} s"
     + (f" ({r['reaction_missed']} missed)" if r["reaction_missed"] else "")),
]


def print_table(results: list[dict]) -> None:
    width = max(len(label) for label, _ in ROWS)
    header = f"| {'':{width}} | " + " | ".join(f"N = {r['count']}" for r in results) + " |"
    print(header)
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * 12 for _ in results) + "|")
    for label, fmt in ROWS:
        print(f"| {label:{width}} | " + " | ".join(fmt(r) for r in results) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="100,500,1000", help="comma-separated N (a fresh cluster each)")
    ap.add_argument("--idle-seconds", type=float, default=120)
    ap.add_argument("--changes", type=int, default=20, help="spec changes for the reaction time")
    ap.add_argument("--change-timeout", type=float, default=60, help="seconds one change may take")
    ap.add_argument("--ready-timeout", type=float, default=900, help="seconds for all N to be Ready")
    ap.add_argument("--resync-seconds", type=float, default=60, help="AUTOGLM_OPERATOR_RESYNC_SECONDS")
    ap.add_argument("--leader-election", action="store_true", help="run the operator with leader election "
                    "(its Lease renewals are reported as idle_leader_writes, not idle_writes)")
    ap.add_argument("--operator-path", type=Path, help="run the operator package from this folder "
                    "(e.g. another checkout's operator/), prepended to PYTHONPATH")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for n in (int(c) for c in args.counts.split(",")):
        results.append(run_one(n, args))
        if args.json:  # written after each N, so a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
