"""The router's overhead: the same streaming load straight to a runtime pod and through `autoglm-router`
in front of that same pod, interleaved in one run (rounds alternate direct / router, so drift in the
machine's load hits both alike).

    .venv/bin/python bench/bench_router.py [--concurrency 50 200] [--rounds 3] [--requests 400]

One `autoglm-runtime serve` process (the tiny model, CPU) and one `autoglm-router` in front of it
(LeastLoad, queue scraping on). Each round sends ``--requests`` streaming chat completions from
``--concurrency`` concurrent clients (aiohttp) and measures each request's TTFT (first `data:` line
with text) and end-to-end time. Prints TTFT p50/p99 direct vs through the router and the difference,
and the router process's CPU seconds (user + system, from /proc) per 1,000 requests. The router's own
histogram (`autoglm_router_added_latency_seconds`) is printed beside: the time it adds before the
response starts, excluding the pod's.

Caveat: on a 2-core machine the client, the router and the runtime share the cores; the router's CPU
competes with the pod's, which shows in the TTFT difference (an upper bound on what a router on its own
node adds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO / "runtime"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never became ready")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def one_round(
    s: aiohttp.ClientSession, url: str, n: int, concurrency: int, max_tokens: int
) -> tuple[list[float], int]:
    """``n`` streaming requests from ``concurrency`` workers on one client session (kept-alive
    connections, as real clients keep them); TTFTs of the successful ones and the failure count."""
    ttfts: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal failures
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": "tiny", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"request {i} says hello"}]}
            start = time.perf_counter()
            first = None
            try:
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        failures += 1
                        await r.read()
                        continue
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                            first = time.perf_counter()
            except aiohttp.ClientError:
                failures += 1
                continue
            if first is None:
                failures += 1
            else:
                ttfts.append(first - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, failures


def histogram(metrics_text: str, name: str) -> tuple[float, float, dict[float, float]]:
    """(sum, count, {le: cumulative count}) of a Prometheus histogram in a text exposition."""
    total = count = 0.0
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "_sum"):
            total = float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count = float(line.split()[-1])
        elif line.startswith(name + "_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return total, count, buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of the observations made between two scrapes."""
    diff = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    n = diff[float("inf")]
    return next(le for le, c in diff.items() if c >= q * n) if n else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[50, 200])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from autoglm_runtime.modelmaker import make_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    model = make_model("tiny", tmp / "tiny", seed=0)
    rport, xport = free_port(), free_port()
    runtime = subprocess.Popen(
        [str(BIN / "autoglm-runtime"), "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(rport),
         "--dtype", "float32", "--device", "cpu", "--served-model-name", "tiny", "--max-batch-size", "64",
         "--max-queue", "1024"],
        stdout=(tmp / "runtime.log").open("w"), stderr=subprocess.STDOUT)
    router = subprocess.Popen(
        [str(BIN / "autoglm-router"), "--port", str(xport), f"--backend=r1=pod-0@127.0.0.1:{rport}",
         "--log-level", "WARNING"],
        stdout=(tmp / "router.log").open("w"), stderr=subprocess.STDOUT)
    direct, routed = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{xport}"
    results = []
    try:
        wait_ready(direct, runtime)
        wait_ready(routed, router)
        for c in args.concurrency:
            ttft: dict[str, list[float]] = {"direct": [], "router": []}
            cpu = reqs = 0.0
            import urllib.request

            def scrape() -> tuple[float, float, dict[float, float]]:
                text = urllib.request.urlopen(routed + "/metrics").read().decode()
                return histogram(text, "autoglm_router_added_latency_seconds")

            sum0, count0, buckets0 = scrape()

            async def run_level(c: int = c, ttft: dict[str, list[float]] = ttft) -> None:
                nonlocal cpu, reqs
                timeout = aiohttp.ClientTimeout(total=300)
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as sd, \
                        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as sr:
                    sessions = {"direct": (sd, direct), "router": (sr, routed)}
                    for s, url in sessions.values():  # warm-up: opens the connections
                        await one_round(s, url, 2 * c, c, args.max_tokens)
                    for rnd in range(args.rounds):
                        for mode in (("direct", "router") if rnd % 2 == 0 else ("router", "direct")):
                            before = cpu_seconds(router.pid)
                            got, failed = await one_round(*sessions[mode], args.requests, c, args.max_tokens)
                            if mode == "router":
                                cpu += cpu_seconds(router.pid) - before
                                reqs += args.requests
                            if failed:
                                print(f"  {mode} c={c} round {rnd}: {failed} failed requests")
                            ttft[mode] += got

            asyncio.run(run_level())
            sum1, count1, buckets1 = scrape()  # (includes the warm-up rounds' observations)
            row = {
                "concurrency": c,
                "requests_each": len(ttft["direct"]),
                "direct_p50_ms": 1000 * statistics.median(ttft["direct"]),
                "router_p50_ms": 1000 * statistics.median(ttft["router"]),
                "direct_p99_ms": 1000 * pct(ttft["direct"], 0.99),
                "router_p99_ms": 1000 * pct(ttft["router"], 0.99),
                "router_cpu_s_per_1000": 1000 * cpu / reqs,
                "router_added_mean_ms": 1000 * (sum1 - sum0) / max(count1 - count0, 1),
                "router_added_p50_ms_at_most": 1000 * bucket_quantile(buckets0, buckets1, 0.5),
                "router_added_p99_ms_at_most": 1000 * bucket_quantile(buckets0, buckets1, 0.99),
            }
            row["added_p50_ms"] = row["router_p50_ms"] - row["direct_p50_ms"]
            row["added_p99_ms"] = row["router_p99_ms"] - row["direct_p99_ms"]
            results.append(row)
    finally:
        for proc in (router, runtime):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\n| concurrency | requests (each) | TTFT p50 direct / router (added) ms | TTFT p99 direct / router "
          "(added) ms | router CPU s / 1,000 req | router's own added time: mean; p50, p99 (bucket bound) ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests_each']} | {r['direct_p50_ms']:.1f} / {r['router_p50_ms']:.1f} "
              f"({r['added_p50_ms']:+.1f}) | {r['direct_p99_ms']:.1f} / {r['router_p99_ms']:.1f} "
              f"({r['added_p99_ms']:+.1f}) | {r['router_cpu_s_per_1000']:.2f} | "
              f"{r['router_added_mean_ms']:.2f}; ≤ {r['router_added_p50_ms_at_most']:g}, "
              f"≤ {r['router_added_p99_ms_at_most']:g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
