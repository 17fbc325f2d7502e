"""Request latency through `autoglm-router` with and without OAuth2, the same pod behind both, interleaved.

    .venv/bin/python bench/bench_router_auth.py [--concurrency 1 32] [--rounds 4] [--requests 500] [--no-hydra]

Two router processes in front of one fake pod (a small aiohttp process that answers each chat completion
at once with a three-event SSE stream, so the router's own time is what differs): one plain, one with
``--oauth2-issuer`` (a real ORY Hydra on loopback, the devcluster ``hydra`` add-on's binary, its RS256 key;
``--no-hydra``: a local issuer with an RSA-2048 key served by the fake pod's process). Both get the same
``Authorization: Bearer <token>`` header (the plain one passes it on). Rounds alternate plain / auth, so
drift in the machine's load hits both alike. Prints per request end-to-end latency p50/p99 for each,
the difference, the router processes' CPU per 1,000 requests and their own added-time histogram mean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("AUTOGLM_VENV_BIN", REPO / ".venv" / "bin"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_auth import hydra_token  # noqa: E402
from bench_router import cpu_seconds, free_port, histogram, pct, wait_ready  # noqa: E402

# The fake pod (and, without Hydra, the issuer: discovery + JWKS of the key in argv[2]).
POD = r"""
import json, sys
from aiohttp import web
port, jwks, issuer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
CHUNKS = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
          b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n"]
async def chat(request):
    await request.read()
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for c in CHUNKS:
        await resp.write(c)
    await resp.write_eof()
    return resp
async def ready(_):
    return web.json_response({"status": "ready"})
async def discovery(_):
    return web.json_response({"issuer": issuer, "jwks_uri": issuer + "jwks.json"})
async def keys(_):
    return web.json_response(json.loads(jwks))
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/ready", ready)
app.router.add_get("/.well-known/openid-configuration", discovery)
app.router.add_get("/jwks.json", keys)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def local_issuer(port: int) -> tuple[str, str, str]:
    """(issuer URL, JWKS JSON, token) for an RSA-2048 key made here; the fake pod serves the documents."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = f"http://127.0.0.1:{port}/"
    jwks = {"keys": [{**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "use": "sig"}]}
    now = int(time.time())
    claims = {"iss": issuer, "aud": ["autoglm"], "sub": "bench", "scp": ["infer"], "exp": now + 7200, "iat": now}
    return issuer, json.dumps(jwks), jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


async def one_round(s: aiohttp.ClientSession, url: str, token: str, n: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    todo = iter(range(n))
    body = {"model": "tiny", "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {token}"}

    async def worker() -> None:
        for _ in todo:
            start = time.perf_counter()
            async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url} answered {r.status}: {(await r.text())[:300]}")
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--no-hydra", action="store_true", help="a local RSA-2048 issuer instead of ORY Hydra")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-auth-"))
    pod_port, plain_port, auth_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    hydra = None
    try:
        if args.no_hydra:
            issuer, jwks, token = local_issuer(pod_port)
            key_desc = "local RS256, 2048-bit key"
        else:
            from devcluster import build_binaries
            from devcluster.addons.hydra import Hydra

            (tmp / "hydra").mkdir()
            hydra = Hydra.start(build_binaries(), tmp / "hydra")
            issuer, jwks, token = hydra.issuer, "{}", hydra_token(hydra)
            key_desc = "ORY Hydra RS256"
        pod = subprocess.Popen([sys.executable, "-c", POD, str(pod_port), jwks, issuer],
                               stdout=(tmp / "pod.log").open("w"), stderr=subprocess.STDOUT)
        procs.append(pod)
        common = [f"--backend=r1=pod-0@127.0.0.1:{pod_port}", "--log-level", "WARNING", "--queue-scrape-interval=0"]
        plain = subprocess.Popen([str(BIN / "autoglm-router"), "--port", str(plain_port), *common],
                                 stdout=(tmp / "plain.log").open("w"), stderr=subprocess.STDOUT)
        auth = subprocess.Popen([str(BIN / "autoglm-router"), "--port", str(auth_port), *common,
                                 f"--oauth2-issuer={issuer}", "--oauth2-audience=autoglm", "--oauth2-scope=infer"],
                                stdout=(tmp / "auth.log").open("w"), stderr=subprocess.STDOUT)
        procs += [plain, auth]
        urls = {"plain": f"http://127.0.0.1:{plain_port}", "auth": f"http://127.0.0.1:{auth_port}"}
        pids = {"plain": plain.pid, "auth": auth.pid}
        wait_ready(f"http://127.0.0.1:{pod_port}", pod)
        wait_ready(urls["plain"], plain)
        wait_ready(urls["auth"], auth)
        import urllib.request

        def added(mode: str) -> tuple[float, float]:
            text = urllib.request.urlopen(urls[mode] + "/metrics").read().decode()
            total, count, _ = histogram(text, "autoglm_router_added_latency_seconds")
            return total, count

        results = []
        for c in args.concurrency:
            lat: dict[str, list[float]] = {"plain": [], "auth": []}
            cpu = dict.fromkeys(lat, 0.0)
            before = {m: added(m) for m in lat}

            async def run_level(c: int = c, lat: dict[str, list[float]] = lat, cpu: dict[str, float] = cpu) -> None:
                timeout = aiohttp.ClientTimeout(total=300)
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
                    for mode in lat:  # warm-up: connections, the auth router's keys
                        await one_round(s, urls[mode], token, 2 * c, c)
                    for rnd in range(args.rounds):
                        for mode in ("plain", "auth") if rnd % 2 == 0 else ("auth", "plain"):
                            t0 = cpu_seconds(pids[mode])
                            lat[mode] += await one_round(s, urls[mode], token, args.requests, c)
                            cpu[mode] += cpu_seconds(pids[mode]) - t0

            asyncio.run(run_level())
            after = {m: added(m) for m in lat}
            row: dict = {"concurrency": c, "requests_each": len(lat["plain"]), "issuer": key_desc}
            for m in lat:
                row[f"{m}_p50_ms"] = 1000 * statistics.median(lat[m])
                row[f"{m}_p99_ms"] = 1000 * pct(lat[m], 0.99)
                row[f"{m}_cpu_ms_per_req"] = 1000 * cpu[m] / len(lat[m])
                row[f"{m}_added_mean_ms"] = 1000 * (after[m][0] - before[m][0]) / max(after[m][1] - before[m][1], 1)
            row["auth_extra_p50_ms"] = row["auth_p50_ms"] - row["plain_p50_ms"]
            row["auth_extra_p99_ms"] = row["auth_p99_ms"] - row["plain_p99_ms"]
            results.append(row)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if hydra is not None:
            hydra.stop()
    print(f"\n# router with vs without OAuth2 ({results[0]['issuer']}), fake pod, {os.cpu_count()} cores")
    print("| concurrency | requests (each) | latency p50 plain / auth (extra) ms | latency p99 plain / auth (extra) ms "
          "| router CPU ms / req plain / auth | router's added-time mean plain / auth ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests_each']} | {r['plain_p50_ms']:.2f} / {r['auth_p50_ms']:.2f} "
              f"({r['auth_extra_p50_ms']:+.2f}) | {r['plain_p99_ms']:.2f} / {r['auth_p99_ms']:.2f} "
              f"({r['auth_extra_p99_ms']:+.2f}) | {r['plain_cpu_ms_per_req']:.3f} / {r['auth_cpu_ms_per_req']:.3f} | "
              f"{r['plain_added_mean_ms']:.3f} / {r['auth_added_mean_ms']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
