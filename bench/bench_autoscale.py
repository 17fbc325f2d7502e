"""Autoscaling benchmark on the local cluster (`make bench-autoscale`): a step load 0 → N → 0 clients.

Starts a fresh cluster with KEDA, runs the operator, applies the tiny model with
`autoscaling.provider: KEDA` (1..3 replicas, targetQueueDepth 2, maxBatchSize 2 so that one pod
queues), then streams chat completions through the Service's ClusterIP: `--clients` for
`--load-seconds`, then none. Samples replicas, ready replicas and waiting requests per pod
(Prometheus) every second and prints:

- time from the load step to the first new pod Ready, and to steady state (replicas stop changing);
- p99 time to first token before and after the scale-up;
- time from the load drop back to one replica; requests ok / failed.

It writes the timeline as a PNG (`--png`, default docs/autoscale.png): replicas, ready replicas,
queue depth per pod and p99 TTFT over time.

    .venv/bin/python bench/bench_autoscale.py [--clients 12] [--load-seconds 90] [--png out.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devcluster import Cluster  # noqa: E402
from tests.e2e.test_autoscaling import Timeline, autoscaled  # noqa: E402
from tests.e2e.test_runtime_pods import Load  # noqa: E402


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--load-seconds", type=float, default=90)
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "autoscale.png")
    args = ap.parse_args()

    import yaml

    with Cluster.start() as kube:
        keda_s = kube.start_keda()
        kube.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        kube.kubectl("wait", "--for=condition=Established", "crd/autoglmdeployments.autoglm.io", "--timeout=60s")
        subprocess.run([str(REPO / ".venv" / "bin" / "autoglm-runtime"), "make-model", "--size", "tiny", "--out",
                        str(kube.models_dir / "tiny")], check=True, capture_output=True)
        ns = "bench"
        kube.kubectl("create", "namespace", ns)
        log = open(kube.dir / "operator.log", "wb")
        op = subprocess.Popen([str(REPO / ".venv" / "bin" / "autoglm-operator")], stdout=log, stderr=subprocess.STDOUT,
                              env={**kube.env, "AUTOGLM_OPERATOR_RESYNC_SECONDS": "5"})
        try:
            kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(autoscaled(kube, "KEDA")))
            deadline = time.monotonic() + 300
            while kube.kubectl("get", "agd", "tiny", "-n", ns, "-o", "jsonpath={.status.phase}").stdout != "Healthy":
                if time.monotonic() > deadline:
                    raise SystemExit(f"tiny never turned Healthy; operator log: {kube.dir / 'operator.log'}")
                time.sleep(1)
            ip = kube.kubectl("get", "svc", "tiny", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
            tl = Timeline(kube, ns, "tiny")
            for _ in range(5):
                tl.sample()
                time.sleep(1)
            load = Load(f"http://{ip}:8000/v1", "tiny", n=args.clients, max_tokens=48)
            t_step = time.monotonic()
            first_ready = None
            with load:
                while time.monotonic() - t_step < args.load_seconds:
                    row = tl.sample()
                    if first_ready is None and row[2] >= 2:
                        first_ready = time.monotonic() - t_step
                    time.sleep(1)
            t_drop = time.monotonic()
            back = None
            while time.monotonic() - t_drop < 240:
                row = tl.sample()
                if back is None and row[1] == 1 and row[2] == 1:
                    back = time.monotonic() - t_drop
                    break
                time.sleep(1)
        finally:
            op.terminate()
            op.wait(timeout=30)

    # Steady state: the last change of the replica or ready count while the load ran.
    rows = tl.rows
    during = [r for r in rows if t_step - tl.t0 <= r[0] <= t_drop - tl.t0]
    steady = max((r[0] for i, r in enumerate(during) if i and r[1:3] != during[i - 1][1:3]), default=during[0][0])
    scaled_at = (first_ready or args.load_seconds) + (t_step - tl.t0)
    ttft_before = [d for s, d in load.ttft if s - tl.t0 < scaled_at]
    ttft_after = [d for s, d in load.ttft if s - tl.t0 >= steady]
    print(f"KEDA start {keda_s:.1f}s; {args.clients} clients for {args.load_seconds:.0f}s")
    print("| figure | value |\n|---|---|")
    print(f"| load step → first new pod Ready | {first_ready:.1f} s |" if first_ready else "| first new pod | never |")
    print(f"| load step → steady replicas | {steady - (t_step - tl.t0):.1f} s (max {max(r[1] for r in rows)}) |")
    print(f"| p99 TTFT before scale-up | {p99(ttft_before):.2f} s ({len(ttft_before)} requests) |")
    print(f"| p99 TTFT at steady state | {p99(ttft_after):.2f} s ({len(ttft_after)} requests) |")
    print(f"| load drop → 1 replica | {back:.1f} s |" if back else "| load drop → 1 replica | not within 240 s |")
    print(f"| requests ok / failed | {load.ok} / {len(load.failed)} |")
    print(tl.table())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    t = [r[0] for r in rows]
    ax[0].step(t, [r[1] for r in rows], where="post", label="replicas")
    ax[0].step(t, [r[2] for r in rows], where="post", label="ready")
    ax[0].set_ylabel("pods")
    ax[0].legend()
    ax[1].plot(t, [r[3] for r in rows], color="tab:red")
    ax[1].set_ylabel("waiting / pod")
    buckets: dict[int, list[float]] = {}
    for s, d in load.ttft:
        buckets.setdefault(int((s - tl.t0) // 5) * 5, []).append(d)
    ax[2].plot(sorted(buckets), [p99(buckets[k]) for k in sorted(buckets)], marker=".")
    ax[2].set_ylabel("p99 TTFT (s), 5 s bins")
    ax[2].set_xlabel("seconds")
    for a in ax:
        a.axvline(t_step - tl.t0, color="grey", ls="--")
        a.axvline(t_drop - tl.t0, color="grey", ls=":")
    fig.suptitle(f"KEDA on queue depth: {args.clients} streaming clients, step up then down")
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"plot: {args.png}")
    return 0 if not load.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
