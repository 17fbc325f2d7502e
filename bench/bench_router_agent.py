"""The router on the phone agent's workload: 3 replicas behind a ClusterIP Service, the router's
LeastLoad and its SessionAffinity, against one replica alone (the second half of `make bench-router`).

    .venv/bin/python bench/bench_router_agent.py [--agents 6] [--steps 4] [--replicas 3] [--kv-positions 32768]
        [--single-kv-positions N] [--single-threads N] [--systems ...] [--png FILE] [--json FILE]

Long tasks with KV pools below what all sessions hold (docs/router.md):
``--agents 6 --steps 12 --max-model-len 8192 --kv-positions 16384 --systems Service,SessionAffinity``.

Workload: `bench_agent.py`'s phone-agent loop, unchanged (seeded; the real system prompt's shape and token
count, a fresh 1080x2400 PNG screenshot first in every step's user message, earlier steps as text with
their answers re-added, so each step's prompt is its predecessor's plus a turn; think time between
steps). Each step generates at most ``--answer-tokens`` tokens (the history still carries the whole
seeded answer): prefix reuse does not depend on them (a step's prompt shares with the previous step's
only up to that step's screenshot, never the generated text), and on 2 cores decoding the answers would
take most of the run.

Systems, one after the other, each on freshly started runtime processes (empty prefix caches):

- ``single``: one `autoglm-runtime serve` process alone (the reference for prefix-cache hits);
- ``Service``: ``--replicas`` processes, the client picking one per request at random (seeded), as a
  ClusterIP Service does: kube-proxy's iptables mode picks a pod at random per connection (no process in
  between). ``--service-pick turn`` takes them in turn instead (IPVS round-robin), which with agents in
  lockstep can keep a session on one pod by accident;
- ``LeastLoad`` and ``SessionAffinity``: the same processes behind one `autoglm-router` (``--backend``
  flags, queue scraping on, the default sessionKey ``prompt``: the system prompt + the task's first
  message, the default loadFactor 1.25); ``SessionAffinity@2``: loadFactor 2 (the bound moves sessions
  off their pod less often at a few sessions per pod).

Every runtime runs with ``OMP_NUM_THREADS=--threads`` (default 1): the replicas share the machine's cores.
Reported per system: wall time, completion tokens/s, failures, the prefix cache's hit and query tokens
summed over the replicas' ``/metrics`` (``autoglm_prefix_cache_hits_total`` / ``..._queries_total``,
deltas over the run), the sessions whose steps all landed on one pod, and (router) sessions moved by
load; per system and step: TTFT p50/p99 and the tokens reused (``cached_tokens``). Then the issue's two
ratios: SessionAffinity's hit tokens / the single replica's (goal >= 0.9) and SessionAffinity's TTFT p50 /
the Service's (goal <= 0.5; the issue's "Service round-robin"), LeastLoad's beside them. A PNG plots TTFT p50/p99 by step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_agent import (  # noqa: E402
    PromptCounter, Sampler, SystemResult, _common_prefix, _is_cjk, _pct, agent_model, drive, git_rev,
    kv_bytes_per_token, messages_of, ours_argv, parse_metrics, plan, plot, step_table,
)
from bench_runtime import VENV_BIN, ServerProcess, free_port  # noqa: E402
from bench_runtime_vl import ensure_model  # noqa: E402

SYSTEMS = ("single", "Service", "LeastLoad", "SessionAffinity", "SessionAffinity@2")
POLICIES = ("LeastLoad", "SessionAffinity")


def start_replicas(n: int, args, model_dir: Path, label: str, threads: int, kv_positions: int) -> list[ServerProcess]:
    """``n`` runtime processes, ``threads`` CPU threads and a KV pool of ``kv_positions`` token positions each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    kv_bytes = kv_positions * kv_bytes_per_token(model_dir, 4)  # float32
    servers = []
    for i in range(n):
        port = free_port()
        flags = ["--kv-cache-memory", str(kv_bytes)]
        argv = [a.replace("{port}", str(port)) for a in ours_argv(args, model_dir, flags)]
        servers.append(ServerProcess(argv, port, args.logdir / f"{label}-pod-{i}.log", env))
    try:
        for s in servers:  # they load at once; wait for each
            s.wait_ready("/ready", timeout=600)
    except RuntimeError:
        for s in servers:
            s.stop()
        raise
    return servers


def start_router(system: str, servers: list[ServerProcess], args) -> ServerProcess:
    """``system``: a policy, or ``SessionAffinity@<loadFactor>``."""
    policy, _, load_factor = system.partition("@")
    port = free_port()
    argv = [str(VENV_BIN / "autoglm-router"), "--port", str(port), "--policy", policy, "--log-level", "WARNING",
            "--load-factor", load_factor or "1.25",
            *(f"--backend=r1=pod-{i}@127.0.0.1:{s.port}" for i, s in enumerate(servers))]
    router = ServerProcess(argv, port, args.logdir / f"router-{system}.log")
    router.wait_ready("/ready", timeout=60)
    return router


def run(system: str, args, model_dir: Path, counter: PromptCounter, workload, warm) -> tuple[SystemResult, dict]:
    """One system on fresh replicas: warm each replica's code paths (a short prompt), then the agents."""
    prompt, agents = workload
    if system == "single":
        servers = start_replicas(1, args, model_dir, system, args.single_threads, args.single_kv_positions)
    else:
        servers = start_replicas(args.replicas, args, model_dir, system, args.threads, args.kv_positions)
    router = None
    body = lambda n: {"ignore_eos": True}  # noqa: E731 - exactly the tokens asked for
    try:
        bases = [f"http://127.0.0.1:{s.port}" for s in servers]
        for b in bases:
            asyncio.run(drive(b, "small-vl-agent", warm[0], warm[1], counter, body, think=False, answer_cap=4))
        if system.partition("@")[0] in POLICIES:
            router = start_router(system, servers, args)
            entry: str | list[str] = f"http://127.0.0.1:{router.port}"
        else:
            entry = bases if len(bases) > 1 else bases[0]
        rng = random.Random(args.seed) if args.service_pick == "random" else None

        async def measured():
            stop = asyncio.Event()
            samplers = [Sampler(b) for b in bases]
            tasks = [asyncio.create_task(s.run(stop)) for s in samplers]
            try:
                wall, records = await drive(entry, "small-vl-agent", prompt, agents, counter, body,
                                            answer_cap=args.answer_tokens, rng=rng)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            return wall, records, samplers

        wall, records, samplers = asyncio.run(measured())
        router_metrics = {}
        if router is not None:
            import httpx

            router_metrics = parse_metrics(httpx.get(f"http://127.0.0.1:{router.port}/metrics", timeout=10).text)
    finally:
        for s in ([router] if router else []) + servers:
            s.stop()
    hits = sum(s.delta("autoglm_prefix_cache_hits_total") or 0 for s in samplers)
    preemptions = sum(s.summary()["preemptions"] or 0 for s in samplers)
    queries = sum(s.delta("autoglm_prefix_cache_queries_total") or 0 for s in samplers)
    homes: dict[int, set[str | None]] = {}
    for r in records:
        homes.setdefault(r.agent, set()).add(r.pod)
    extra = {
        "replicas": len(servers),
        "prefix_hits": hits,
        "prefix_queries": queries,
        "preemptions": preemptions,
        "sessions_on_one_pod": sum(len(h) == 1 for h in homes.values()),
        "sessions": len(homes),
        "moved_by_load": router_metrics.get("autoglm_router_sessions_moved_by_load_total"),
        "retries": router_metrics.get("autoglm_router_retries_total"),
    }
    tokens = sum(r.completion_tokens for r in records if r.error is None)
    res = SystemResult(system, True, wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
                       failures=sum(r.error is not None for r in records),
                       metrics={"prefix_hits": hits, "prefix_queries": queries}, records=records)
    return res, extra


def ttft_p50(res: SystemResult, first_step: int = 1) -> float | None:
    return res.ttft_p50_from(first_step)


def summary_table(results: dict[str, tuple[SystemResult, dict]]) -> str:
    rows = ["| system | replicas | wall s | tokens/s | failures | prefix-cache hits / queries (tokens) | hit rate | "
            "sessions on one pod | moved by load | preemptions | TTFT p50 / p99 s (all steps) | "
            "TTFT p50 s (steps >= 2) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (res, x) in results.items():
        ttfts = [r.ttft for r in res.records if r.error is None and r.ttft is not None]
        rate = x["prefix_hits"] / x["prefix_queries"] if x["prefix_queries"] else float("nan")
        moved = "-" if x["moved_by_load"] is None else f"{x['moved_by_load']:.0f}"
        rows.append(f"| {name} | {x['replicas']} | {res.wall_s:.1f} | {res.tokens_per_s:.1f} | {res.failures} | "
                    f"{x['prefix_hits']:,.0f} / {x['prefix_queries']:,.0f} | {rate:.1%} | "
                    f"{x['sessions_on_one_pod']} of {x['sessions']} | {moved} | {x.get('preemptions', 0):.0f} | "
                    f"{_pct(ttfts, 0.5) or float('nan'):.3f} / {_pct(ttfts, 0.99) or float('nan'):.3f} | "
                    f"{ttft_p50(res, 2) or float('nan'):.3f} |")
    return "\n".join(rows)


def ratios(results: dict[str, tuple[SystemResult, dict]], steps: int = 0) -> list[tuple[str, str, str]]:
    """(what, measured, goal): hit tokens against one replica's, TTFT p50 against the Service's (all steps, steps
    >= 2, and for tasks of 8 steps or more their second half)."""
    rows = []
    half = steps // 2 + 1
    windows = [(1, "all steps"), (2, "steps >= 2")] + ([(half, f"steps >= {half}")] if steps >= 8 else [])
    single, rr = results.get("single"), results.get("Service")
    for name in [n for n in results if n != "single"]:
        if name not in results:
            continue
        res, x = results[name]
        goal_hits, goal_ttft = (">= 0.9", "<= 0.5") if name == "SessionAffinity" else ("", "")
        if single and single[1]["prefix_hits"]:
            rows.append((f"{name}: prefix-cache hit tokens / single replica's",
                         f"{x['prefix_hits']:,.0f} / {single[1]['prefix_hits']:,.0f} = "
                         f"{x['prefix_hits'] / single[1]['prefix_hits']:.2f}x", goal_hits))
        if rr and name != "Service":
            for first, label in windows:
                ours, theirs = ttft_p50(res, first), ttft_p50(rr[0], first)
                if ours and theirs:
                    rows.append((f"{name}: TTFT p50 / the Service's ({label})",
                                 f"{ours:.3f} s / {theirs:.3f} s = {ours / theirs:.2f}x", goal_ttft))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=6)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--think-time", default="0.5:1.5", metavar="MIN:MAX", help="seconds between steps (uniform)")
    p.add_argument("--answer-tokens", type=int, default=16, help="most tokens generated per step")
    p.add_argument("--image-tokens", type=int, default=1200, help="merged image tokens per 1080x2400 screenshot")
    p.add_argument("--system-chars", type=int, default=1100,
                   help="system prompt characters (1100: the real prompt's ~2,400 tokens with the test tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every runtime process")
    p.add_argument("--service-pick", choices=("random", "turn"), default="random",
                   help="how the Service system picks a replica per request")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--ours-cmd", default=str(VENV_BIN / "autoglm-runtime") + " serve")
    p.add_argument("--ours-flags", default="", help="extra runtime flags for every replica")
    p.add_argument("--kv-positions", type=int, default=32768,
                   help="each replica's KV pool in token positions (32,768: 256 MiB of small-vl in float32)")
    p.add_argument("--single-kv-positions", type=int,
                   help="the single replica's KV pool (default --kv-positions; more: the reference with room for "
                        "every session)")
    p.add_argument("--single-threads", type=int,
                   help="OMP_NUM_THREADS of the single replica (default --threads; its timings are not compared)")
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "models" / "small-vl")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "bench" / "router-agent-ttft.png")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    if unknown := {s for s in systems if s not in SYSTEMS and not re.fullmatch(r"SessionAffinity@\d+(\.\d+)?", s)}:
        p.error(f"unknown systems: {', '.join(sorted(unknown))} (SessionAffinity@<loadFactor> for another bound)")
    args.single_kv_positions = args.single_kv_positions or args.kv_positions
    args.single_threads = args.single_threads or args.threads
    args.logdir = REPO / ".tmp" / "bench-router-agent"
    args.logdir.mkdir(parents=True, exist_ok=True)
    model_dir = agent_model(ensure_model(args.model_dir), args.image_tokens, args.max_model_len)
    counter = PromptCounter(model_dir)
    think = tuple(float(x) for x in args.think_time.split(":"))
    workload = plan(args.agents, args.steps, args.seed, (think[0], think[-1]), args.system_chars)
    warm = plan(1, 1, args.seed + 7, (0.0, 0.0), 200)
    rev = git_rev()
    # What the caches would have to hold: every task's last prompt (the system prompt once, shared by all).
    last = [counter.ids(messages_of(workload[0], seq, len(seq))) for seq in workload[1]]
    common = min(_common_prefix(last[0], ids) for ids in last)
    distinct = common + sum(len(ids) - common for ids in last)
    print(f"workload: {args.agents} agents x {args.steps} steps, think {args.think_time}s, <= {args.answer_tokens} "
          f"tokens per answer; system prompt {len(workload[0])} chars ({sum(map(_is_cjk, workload[0]))} CJK) = "
          f"{len(counter.tok(workload[0])['input_ids'])} tokens; {counter.image_tokens} image tokens per screenshot; "
          f"{args.replicas} replicas, OMP_NUM_THREADS={args.threads}; commit {rev}", flush=True)
    print(f"KV per replica: {args.kv_positions:,} positions; the tasks' last prompts hold {distinct:,} distinct tokens"
          f" ({common:,} shared by all, {(distinct - common) / len(last):,.0f} per task beyond them): a replica holds "
          f"{args.kv_positions / distinct:.2f}x of them; the single replica: {args.single_kv_positions:,} positions, "
          f"OMP_NUM_THREADS={args.single_threads}", flush=True)
    results: dict[str, tuple[SystemResult, dict]] = {}
    for system in systems:
        print(f"running {system} ...", flush=True)
        results[system] = run(system, args, model_dir, counter, workload, warm)
        print(f"  {results[system][0].wall_s:.1f}s, {results[system][0].failures} failed", flush=True)
    print()
    print(summary_table(results))
    print()
    print(step_table([res for res, _ in results.values()]))
    print()
    print("| ratio | measured | goal |\n|---|---|---|")
    for row in ratios(results, args.steps):
        print("| " + " | ".join(row) + " |")
    title = (f"Phone-agent loop over {args.replicas} replicas: {args.agents} agents x {args.steps} steps, small-vl, "
             f"{counter.image_tokens} image tokens, {args.device}, commit {rev}")
    plot([res for res, _ in results.values()], args.png, title)
    print(f"plot: {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": {k: {"result": asdict(r), **x} for k, (r, x) in results.items()},
                                         "ratios": ratios(results, args.steps)}, indent=2))
    return 0 if all(res.failures == 0 for res, _ in results.values()) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally) on SIGTERM too
    sys.exit(main())
