"""`/health` latency while the server is under full load (is the event loop ever blocked on the engine?).

Starts a real `autoglm-runtime serve` on a locally made model, saturates it from a separate process
(`--concurrency` clients sending chat requests with long prompts, so tokenization and chat templates
are real work, and streaming long answers), and meanwhile probes `GET /health` on its own keep-alive
connection every `--interval` seconds. Prints p50/p99/max of the probe latency, idle and under load.

    .venv/bin/python bench/health_under_load.py                         # this checkout
    .venv/bin/python bench/health_under_load.py --pythonpath OLD/runtime # another checkout's runtime
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while the server streams tokens to every client "
         "kubernetes operators reconcile state and autoscalers read queue depth").split()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, concurrency: int, prompt_words: int, max_tokens: int, stop_at: float, out: "mp.Queue") -> None:
    async def worker(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        rng = random.Random(i)
        done = tokens = 0
        while time.time() < stop_at:
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": True}
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            tokens += 1
                done += 1
            except httpx.HTTPError:
                pass
        return done, tokens

    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            results = await asyncio.gather(*(worker(client, i) for i in range(concurrency)))
        out.put((sum(r[0] for r in results), sum(r[1] for r in results)))

    asyncio.run(main())


def _probe(url: str, seconds: float, interval: float) -> list[float]:
    lat: list[float] = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = client.get("/health")
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(interval)
    return lat


def _summary(name: str, lat: list[float]) -> str:
    ms = sorted(x * 1000 for x in lat)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return (f"{name:>10}: n={len(ms):4d}  p50={statistics.median(ms):7.2f} ms  p99={p99:7.2f} ms  "
            f"max={ms[-1]:7.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--pythonpath", help="run the server with this runtime source root first on PYTHONPATH")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="health-bench-"))
    model = tmp / "m"
    cli = [sys.executable, "-m", "autoglm_runtime.cli"]
    subprocess.run([*cli, "make-model", "--size", args.size, "--out", str(model)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_RUNTIME_")}
    if args.pythonpath:
        env["PYTHONPATH"] = str(Path(args.pythonpath).resolve())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([*cli, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--max-batch-size", str(args.max_batch_size),
                             "--max-queue", str(args.concurrency * 2), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                print((tmp / "server.log").read_text()[-3000:], file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)

        idle = _probe(url, min(5.0, args.seconds), args.interval)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        warmup = 3.0
        stop_at = time.time() + warmup + args.seconds
        loader = ctx.Process(
            target=_load, args=(url, args.concurrency, args.prompt_words, args.max_tokens, stop_at, out))
        loader.start()
        time.sleep(warmup)
        busy = _probe(url, args.seconds, args.interval)
        loader.join()
        done, chunks = out.get(timeout=60)
        print(f"server: {'PYTHONPATH=' + args.pythonpath if args.pythonpath else 'this checkout'}; model {args.size}; "
              f"{args.concurrency} clients, batch {args.max_batch_size}, ~{args.prompt_words}-word prompts, "
              f"{args.max_tokens} tokens each")
        print(_summary("idle", idle))
        print(_summary("under load", busy))
        print(f"      load: {done} requests, {chunks} chunks in {args.seconds:.0f} s "
              f"({chunks / args.seconds:.0f} chunks/s)")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
