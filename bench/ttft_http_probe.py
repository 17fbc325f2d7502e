"""TTFT breakdown over HTTP: runs `autoglm-runtime serve` in a subprocess with the engine patched to
record (wall clock) per request: admit, first scheduled, first token (engine thread), first output
dispatched on the event loop; the client records send and first SSE chunk. Prints where the time goes.

    .venv/bin/python bench/ttft_http_probe.py [--requests 192] [--clients 64] [-- extra serve args]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "bench"))

SERVER = r'''
import atexit, json, sys, time
from autoglm_runtime.engine_admission import Admission
from autoglm_runtime.engine_loop import StepLoop
from autoglm_runtime.engine_output import Outbox
log = {}; steps = []; DUMP = sys.argv.pop(1)
orig_admit, orig_dispatch, orig_finish = Admission.new_request, Outbox.dispatch, StepLoop.finish_step
def _admit(self, rid, *a, **k):
    req = orig_admit(self, rid, *a, **k)
    log[rid] = {"admit": time.time(), "mono_off": time.time() - time.monotonic()}
    return req
def _dispatch(items):
    now = time.time()
    for req, item in items:
        d = log.get(req.seq.request_id)
        if d is not None and "dispatch" not in d and getattr(item, "new_token_ids", None):
            d["dispatch"] = now
            d["sched"] = item.first_scheduled_time + d["mono_off"]
            d["tok"] = item.first_token_time + d["mono_off"]
    orig_dispatch(items)
def _finish(self, inst, out, tokens, seconds, logprobs=None):
    t = time.time(); orig_finish(self, inst, out, tokens, seconds, logprobs)
    steps.append((t, seconds, len(out.decodes), out.num_prefill_tokens, time.time() - t))
Admission.new_request = _admit; Outbox.dispatch = staticmethod(_dispatch); StepLoop.finish_step = _finish
def dump():
    json.dump({"reqs": log, "steps": steps}, open(DUMP, "w"))
atexit.register(dump)
from autoglm_runtime.cli import main
sys.exit(main())
'''


async def drive(base, reqs, clients):
    import httpx
    q: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        q.put_nowait(r)
    recs = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as c:
        async def worker():
            wave = 0
            while not q.empty():
                r = q.get_nowait()
                body = {"model": "small", "prompt": r.prompt, "max_tokens": r.max_new, "temperature": 0.0, "stream": True,
                        "ignore_eos": True, "user": f"p{r.idx}"}
                rec = {"idx": r.idx, "wave": wave, "send": time.time()}
                wave += 1
                async with c.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            ch = json.loads(line[6:])
                            rec.setdefault("rid", ch.get("id"))
                            if "first" not in rec and any(x.get("text") for x in ch.get("choices") or []):
                                rec["first"] = time.time()
                recs.append(rec)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0, recs


def main():
    from bench_runtime import ServerProcess, _pct, free_port, make_workload
    from transformers import AutoTokenizer
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--out", default="/tmp/ttft_http.json")
    p.add_argument("extra", nargs="*")
    a = p.parse_args()
    md = REPO / ".cache" / "models" / "small"
    reqs = make_workload(AutoTokenizer.from_pretrained(md), a.requests, 0)
    port = free_port()
    dump = f"/tmp/ttft_server_{port}.json"
    argv = [sys.executable, "-c", SERVER, dump, "serve", "--model", str(md), "--host", "127.0.0.1", "--port", str(port),
            "--max-batch-size", "64", "--max-batch-tokens", "1024", "--dtype", "float32", "--device", "cpu",
            "--served-model-name", "small", "--max-queue", "400", "--log-level", "warning", *a.extra]
    srv = ServerProcess(argv, port, Path("/tmp/ttft_http_server.log"))
    try:
        srv.wait_ready("/ready")
        asyncio.run(drive(f"http://127.0.0.1:{port}", reqs[:2], 2))
        wall, recs = asyncio.run(drive(f"http://127.0.0.1:{port}", reqs, a.clients))
    finally:
        srv.stop()
    data = json.load(open(dump))
    print(f"wall {wall:.2f}s {sum(r.max_new for r in reqs) / wall:.1f} tok/s")
    # match server records to client records by admit order is fragile: use x-request-id if present, else time order
    srv_reqs = data["reqs"]
    have_ids = all(r.get("rid") in srv_reqs for r in recs)
    if not have_ids:
        srv_sorted = sorted(srv_reqs.values(), key=lambda d: d["admit"])[2:]
        recs_sorted = sorted(recs, key=lambda r: r["send"])
        pairs = list(zip(recs_sorted, srv_sorted))
    else:
        pairs = [(r, srv_reqs[r["rid"]]) for r in recs]
    print(f"matched by {'request id' if have_ids else 'arrival order (approximate)'}")
    rows = []
    for c, s in pairs:
        if "first" not in c or "dispatch" not in s:
            continue
        rows.append({"wave": c["wave"], "ttft": c["first"] - c["send"], "ingress": s["admit"] - c["send"],
                     "queue": s["sched"] - s["admit"], "prefill": s["tok"] - s["sched"],
                     "to_loop": s["dispatch"] - s["tok"], "egress": c["first"] - s["dispatch"]})
    for name, sel in (("all", rows), ("steady", [r for r in rows if r["wave"] > 0])):
        for k in ("ttft", "ingress", "queue", "prefill", "to_loop", "egress"):
            xs = [r[k] for r in sel]
            print(f"  {name:6} {k:8} p50 {_pct(xs, .5):.3f} p90 {_pct(xs, .9):.3f} p99 {_pct(xs, .99):.3f} max {max(xs):.3f}")
    st = [s[1] for s in data["steps"]]
    post = [s[4] for s in data["steps"]]
    print(f"  step s p50 {_pct(st, .5):.3f} p99 {_pct(st, .99):.3f} max {max(st):.3f}; finish_step s p50 {_pct(post, .5):.4f} max {max(post):.4f}")
    json.dump({"rows": rows, "steps": data["steps"]}, open(a.out, "w"))


if __name__ == "__main__":
    main()
