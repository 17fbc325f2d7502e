"""TTFT probe: drive the Engine directly (no HTTP) with bench_runtime's closed-loop workload and
record per-request and per-step timings, to see where time-to-first-token goes.

    .venv/bin/python bench/ttft_probe.py [--requests 192] [--clients 64] [--max-batch-tokens 1024]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "bench"))

from bench_runtime import _pct, ensure_model, make_workload  # noqa: E402


async def main_async(args) -> None:
    import torch
    from autoglm_runtime.engine import Engine, SamplingParams
    from autoglm_runtime.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ensure_model(REPO / ".cache" / "models" / args.size, args.size), "float32", "cpu")
    reqs = make_workload(loaded.tokenizer, args.requests, 0)
    steps = []
    t_origin = time.monotonic()

    def on_step(s):
        steps.append((time.monotonic() - t_origin, s.step_seconds, s.num_decode_tokens, s.num_prefill_tokens, s.num_waiting, s.num_running))

    eng = Engine(loaded, max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                 max_queue=1000, on_step=on_step, max_model_len=args.max_model_len)
    await eng.start()
    # warm-up
    async for _ in eng.generate("w", reqs[0].prompt_ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
        pass
    steps.clear()
    q: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        q.put_nowait(r)
    recs = []

    async def worker():
        wave = 0
        while not q.empty():
            r = q.get_nowait()
            t0 = time.monotonic()
            rec = {"idx": r.idx, "wave": wave, "plen": len(r.prompt_ids)}
            wave += 1
            async for out in eng.generate(f"r{r.idx}", r.prompt_ids, SamplingParams(max_tokens=r.max_new, temperature=0.0, ignore_eos=True)):
                if "ttft_client" not in rec and out.new_token_ids:
                    rec["ttft_client"] = time.monotonic() - t0
                    rec["arrival"] = out.arrival_time - t_origin
                    rec["queue"] = out.queue_time
                    rec["ttft_engine"] = out.time_to_first_token
                    rec["sched_to_tok"] = out.first_token_time - out.first_scheduled_time
                    rec["first_ids"] = []
                if "ttft_text" not in rec and "first_ids" in rec:
                    rec["first_ids"] += out.new_token_ids
                    if out.new_text:
                        rec["ttft_text"] = time.monotonic() - t0
                        rec["tokens_before_text"] = len(rec["first_ids"]) - 1
            rec.setdefault("ttft_text", time.monotonic() - t0)  # never any text: counts as e2e
            rec.setdefault("tokens_before_text", len(rec["first_ids"]))
            recs.append(rec)

    t_origin = time.monotonic()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    await eng.stop()
    toks = sum(r.max_new for r in reqs)
    print(f"wall {wall:.2f}s  {toks / wall:.1f} tok/s  steps {len(steps)}")
    for name, sel in (("all", recs), ("steady", [r for r in recs if r["wave"] > 0])):
        for key in ("ttft_text", "ttft_client", "ttft_engine", "queue", "sched_to_tok"):
            xs = [r[key] for r in sel]
            print(f"  {name:6} {key:13} p50 {_pct(xs, .5):.3f} p90 {_pct(xs, .9):.3f} p99 {_pct(xs, .99):.3f} max {max(xs):.3f}")
    late = [r for r in recs if r.get("tokens_before_text")]
    print(f"  requests whose first token(s) decode to no text: {len(late)}; e.g. " + "; ".join(
        f"#{r['idx']} ids {r['first_ids'][:6]} +{r['ttft_text'] - r['ttft_client']:.2f}s" for r in late[:8]))
    st = [s[1] for s in steps]
    print(f"  step s: p50 {_pct(st, .5):.3f} p90 {_pct(st, .9):.3f} p99 {_pct(st, .99):.3f} max {max(st):.3f}")
    if args.verbose:
        print("steps: t, secs, dec, prefill_tok, waiting, running")
        for s in steps:
            print("  %.3f %.3f %3d %4d %3d %3d" % s)
        print("slowest steady requests:")
        for r in sorted([r for r in recs if r["wave"] > 0], key=lambda r: -r["ttft_client"])[:10]:
            print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--size", default="small")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
