"""Throughput and latency of the autoglm runtime against three baselines, side by side, in one run.

    .venv/bin/python bench/bench_runtime.py [--quick] [--json results.json]

Workload (deterministic for a seed): the `small` GLM (~28M parameters, random weights, fp32, CPU),
192 requests (``--quick``: 32), prompts of 16-160 words, 32-64 new tokens each, greedy, exactly that
many tokens generated in every system (EOS is ignored: ``generation_config.eos_token_id = None`` for
``generate``, ``ignore_eos`` for our server -- both may emit EOS and go on; for ``transformers serve``,
``min_new_tokens``/``max_new_tokens`` in its per-request ``generation_config``, and the count is
checked from its usage).

Systems:
  1. sequential  -- ``model.generate`` once per request, one after the other.
  2. padded      -- ONE left-padded batch of every request through ``model.generate`` with
                    ``max_new_tokens`` = the largest target; each request's tokens beyond its own
                    target are generated but not counted (that waste is the cost of static batching).
  3. hf-serve    -- ``transformers serve --continuous-batching --device cpu`` over HTTP.
  4. autoglm     -- ``autoglm-runtime serve`` over HTTP.
  5. baseline    -- with ``--baseline-runtime DIR``: ``autoglm-runtime serve`` from another checkout's
                    ``runtime/`` (an earlier engine), same flags, same venv, last in the same run.
Systems 3, 4 and 5 are driven by the same asyncio load generator: ``--clients`` (64) concurrent
streaming clients pulling requests from one queue, measuring TTFT (first non-empty text chunk) and
end-to-end latency per request. The offline systems 1 and 2 have no per-request latency (every
request is there at t=0); their latency columns are empty.

Also checks that our server's greedy output equals sequential ``generate`` token for token on the
same prompts (fp32) and prints PASS/FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO))


@dataclass
class Req:
    idx: int
    prompt: str
    prompt_ids: list[int]
    max_new: int


@dataclass
class Result:
    system: str
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    e2e_p50: float | None = None
    e2e_p99: float | None = None
    failures: int = 0
    steady_ttft_p50: float | None = None
    steady_ttft_p99: float | None = None
    note: str = ""
    token_ids: dict[int, list[int]] = field(default_factory=dict, repr=False)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ workload


def make_workload(tokenizer, n: int, seed: int) -> list[Req]:
    from autoglm_runtime.modelmaker import _WORDS  # the tokenizer's own training vocabulary

    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(16, 160))]
        prompt = " ".join(words).capitalize()
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reqs.append(Req(i, prompt, ids, rng.randint(32, 64)))
    return reqs


def ensure_model(path: Path, size: str) -> Path:
    if not (path / "config.json").is_file():
        from autoglm_runtime.modelmaker import make_model

        print(f"making the {size} model in {path} ...", flush=True)
        make_model(size, path)
    return path


# ------------------------------------------------------------------ offline baselines


def run_sequential(model, reqs: list[Req], pad_id: int) -> Result:
    import torch

    out: dict[int, list[int]] = {}
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in reqs:
            ids = torch.tensor([r.prompt_ids])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new,
                                 do_sample=False, pad_token_id=pad_id)
            new = gen[0, ids.shape[1]:].tolist()
            out[r.idx] = new
            tokens += len(new)
    wall = time.perf_counter() - t0
    return Result("1 sequential generate", wall, tokens, tokens / wall, token_ids=out)


def run_padded(model, tokenizer, reqs: list[Req], pad_id: int) -> Result:
    import torch

    longest = max(len(r.prompt_ids) for r in reqs)
    max_new = max(r.max_new for r in reqs)
    ids = torch.full((len(reqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(reqs):
        ids[row, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, longest - len(r.prompt_ids):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
    wall = time.perf_counter() - t0
    counted = sum(r.max_new for r in reqs)  # only each request's own target
    generated = gen.shape[0] * (gen.shape[1] - longest)
    return Result("2 one padded batch generate", wall, counted, counted / wall,
                  note=f"{generated} generated, {counted} counted")


# ------------------------------------------------------------------ HTTP load generator


async def drive(base_url: str, reqs: list[Req], clients: int, body_extra, model_name: str,
                want_token_ids: bool = False) -> tuple[float, list[dict]]:
    import httpx

    queue: asyncio.Queue[Req] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            wave = 0  # 0: this client's first request (all clients start at once), then 1, 2, ...
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {"model": model_name, "prompt": r.prompt, "max_tokens": r.max_new, "temperature": 0.0,
                        "stream": True, "stream_options": {"include_usage": True}, **body_extra(r)}
                rec = {"idx": r.idx, "ok": False, "ttft": None, "e2e": None, "tokens": 0, "token_ids": [],
                       "error": None, "wave": wave}
                wave += 1
                t0 = time.perf_counter()
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as resp:
                        if resp.status_code != 200:
                            rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                            records.append(rec)
                            continue
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                break
                            chunk = json.loads(data)
                            if "error" in chunk:
                                rec["error"] = str(chunk["error"])[:200]
                                break
                            for ch in chunk.get("choices") or []:
                                if ch.get("text") and rec["ttft"] is None:
                                    rec["ttft"] = time.perf_counter() - t0
                                if want_token_ids and ch.get("token_ids"):
                                    rec["token_ids"].extend(ch["token_ids"])
                            if chunk.get("usage"):
                                rec["tokens"] = chunk["usage"]["completion_tokens"]
                    rec["e2e"] = time.perf_counter() - t0
                    rec["ok"] = rec["error"] is None
                except Exception as exc:  # noqa: BLE001 - recorded as a failure
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                records.append(rec)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, records


def summarize(name: str, wall: float, records: list[dict], reqs: list[Req]) -> Result:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    target = {r.idx: r.max_new for r in reqs}
    notes = []
    short = [r for r in ok if r["tokens"] != target[r["idx"]]]
    if short:
        notes.append(f"{len(short)} requests generated a different token count than asked")
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    # Every client sends its first request at t=0 (a burst of `clients` arrivals); the later ones
    # arrive one by one as earlier requests finish: the steady state.
    steady = [r["ttft"] for r in ok if r["ttft"] is not None and r["wave"] > 0]
    if steady:
        notes.append(f"TTFT after the first burst: p50 {_pct(steady, 0.5):.3f}s p99 {_pct(steady, 0.99):.3f}s")
    errs = [r["error"] for r in records if not r["ok"]]
    if errs:
        notes.append(f"first error: {errs[0]}")
    return Result(name, wall, tokens, tokens / wall,
                  ttft_p50=_pct(ttfts, 0.5), ttft_p99=_pct(ttfts, 0.99),
                  e2e_p50=_pct([r["e2e"] for r in ok], 0.5), e2e_p99=_pct([r["e2e"] for r in ok], 0.99),
                  failures=len(records) - len(ok),
                  steady_ttft_p50=_pct(steady, 0.5), steady_ttft_p99=_pct(steady, 0.99),
                  note="; ".join(notes), token_ids={r["idx"]: r["token_ids"] for r in ok})


class ServerProcess:
    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None) -> None:
        self.port = port
        self.log = log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                     start_new_session=True)

    def wait_ready(self, path: str, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout}s; log: {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.fh.close()


def run_hf_serve(model_dir: Path, reqs: list[Req], clients: int, args, logdir: Path) -> Result:
    port = free_port()
    argv = [str(VENV_BIN / "transformers"), "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
            "--cb-num-blocks", str(args.cb_num_blocks), "--cb-max-batch-tokens", str(args.max_batch_tokens),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--attn-implementation", "sdpa"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    srv = ServerProcess(argv, port, logdir / "hf-serve.log", env)
    try:
        srv.wait_ready("/health")
        base = f"http://127.0.0.1:{port}"

        def extra(r: Req) -> dict:
            return {"generation_config": json.dumps({"do_sample": False, "max_new_tokens": r.max_new,
                                                      "min_new_tokens": r.max_new})}

        # Warm-up: CB is created lazily on the first request.
        asyncio.run(drive(base, reqs[:2], 2, extra, str(model_dir)))
        wall, records = asyncio.run(drive(base, reqs, clients, extra, str(model_dir)))
    finally:
        srv.stop()
    return summarize("3 transformers serve --continuous-batching", wall, records, reqs)


# Runs `autoglm-runtime serve` from another checkout's runtime/ (the baseline engine, system 5) with this
# venv's python, and refuses to run if the package came from anywhere else.
_SERVE_FROM = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import autoglm_runtime, pathlib; "
    "assert pathlib.Path(autoglm_runtime.__file__).parent.parent == pathlib.Path(sys.path[0]), autoglm_runtime.__file__; "
    "from autoglm_runtime.cli import main; sys.exit(main())"
)


def run_autoglm(model_dir: Path, reqs: list[Req], clients: int, args, logdir: Path, runtime_dir: Path | None = None,
                name: str = "4 autoglm-runtime serve") -> Result:
    port = free_port()
    prog = [sys.executable, "-c", _SERVE_FROM, str(runtime_dir)] if runtime_dir else [str(VENV_BIN / "autoglm-runtime")]
    extra_flags = [] if runtime_dir else args.serve_arg
    argv = [*prog, "serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--max-batch-size", str(args.max_batch_size), "--max-batch-tokens",
            str(args.max_batch_tokens), "--dtype", "float32", "--device", "cpu", "--served-model-name", "small",
            "--max-queue", str(len(reqs) + 8), "--log-level", "warning", *extra_flags]
    srv = ServerProcess(argv, port, logdir / ("autoglm-baseline.log" if runtime_dir else "autoglm.log"))
    try:
        srv.wait_ready("/ready")
        base = f"http://127.0.0.1:{port}"

        def extra(r: Req) -> dict:
            return {"ignore_eos": True, "return_token_ids": True}

        asyncio.run(drive(base, reqs[:2], 2, extra, "small"))
        wall, records = asyncio.run(drive(base, reqs, clients, extra, "small", want_token_ids=True))
    finally:
        srv.stop()
    return summarize(name, wall, records, reqs)


# ------------------------------------------------------------------ report


def _f(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else (f"{x:.3f}{unit}" if unit == "s" else f"{x:.1f}")


def print_table(results: list[Result]) -> None:
    hdr = f"{'system':44} {'wall':>9} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'E2E p50':>9} {'E2E p99':>9} {'fail':>4}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.system:44} {r.wall_s:8.2f}s {r.output_tokens:7d} {r.tokens_per_s:8.1f} {_f(r.ttft_p50):>9} "
              f"{_f(r.ttft_p99):>9} {_f(r.e2e_p50):>9} {_f(r.e2e_p99):>9} {r.failures:4d}")
        if r.note:
            print(f"    note: {r.note}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 requests, 16 clients: a smoke run")
    p.add_argument("--requests", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--model-dir", type=Path, help="default: .cache/models/<size> (made if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=64, help="our server's --max-batch-size")
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="token budget per step, both servers")
    p.add_argument("--cb-num-blocks", type=int, default=256)
    p.add_argument("--skip", default="", help="comma list of systems to skip: 1,2,3,4")
    p.add_argument("--baseline-runtime", type=Path, metavar="DIR",
                   help="also run system 5: `autoglm-runtime serve` from DIR (another checkout's runtime/, e.g. "
                        "`git worktree add /tmp/old 3d2a9e4` -> /tmp/old/runtime), same flags, this venv")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for our server (system 4 only), repeatable: --serve-arg=--max-num-batched-tokens=512")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the offline baselines (0: default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    n = args.requests or (32 if args.quick else 192)
    clients = args.clients or (16 if args.quick else 64)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = ensure_model(args.model_dir or REPO / ".cache" / "models" / args.size, args.size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reqs = make_workload(tokenizer, n, args.seed)
    logdir = REPO / ".tmp" / "bench-runtime"
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"model={model_dir} requests={n} clients={clients} prompt_tokens={sum(len(r.prompt_ids) for r in reqs)} "
          f"target_new_tokens={sum(r.max_new for r in reqs)} torch_threads={torch.get_num_threads()}", flush=True)

    results: list[Result] = []
    seq: Result | None = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not {"1", "2"} <= skip:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        # EOS ignored exactly like the server's `ignore_eos`: it may be generated, it does not stop
        # (min_new_tokens would instead forbid it and change the greedy tokens).
        model.generation_config.eos_token_id = None
        model.generate(torch.tensor([reqs[0].prompt_ids]), max_new_tokens=2, do_sample=False, pad_token_id=pad_id)
        if "1" not in skip:
            print("running 1 sequential generate ...", flush=True)
            seq = run_sequential(model, reqs, pad_id)
            results.append(seq)
        if "2" not in skip:
            print("running 2 one padded batch ...", flush=True)
            results.append(run_padded(model, tokenizer, reqs, pad_id))
        del model
    if "3" not in skip:
        print("running 3 transformers serve --continuous-batching ...", flush=True)
        try:
            results.append(run_hf_serve(model_dir, reqs, clients, args, logdir))
        except Exception as exc:  # noqa: BLE001 - report and go on with ours
            print(f"  transformers serve failed: {exc}", flush=True)
    ours: Result | None = None
    if "4" not in skip:
        print("running 4 autoglm-runtime serve ...", flush=True)
        ours = run_autoglm(model_dir, reqs, clients, args, logdir)
        results.append(ours)
    if args.baseline_runtime:
        print(f"running 5 autoglm-runtime serve from {args.baseline_runtime} ...", flush=True)
        results.append(run_autoglm(model_dir, reqs, clients, args, logdir, args.baseline_runtime.resolve(),
                                   f"5 baseline ({args.baseline_runtime})"))

    print()
    print_table(results)
    by = {r.system[0]: r for r in results}
    ratios = {}
    if "4" in by:
        for other in ("1", "2", "3", "5"):
            if other in by and by[other].tokens_per_s > 0:
                ratios[f"4/{other}"] = by["4"].tokens_per_s / by[other].tokens_per_s
    print()
    print("throughput ratios: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    if ours and ours.ttft_p50:
        print(f"autoglm TTFT p99/p50 = {ours.ttft_p99 / ours.ttft_p50:.2f}")
    for other in ("3", "5"):
        if "4" in by and other in by and by["4"].ttft_p50 and by[other].ttft_p50:
            print(f"TTFT p50 4/{other} = {by['4'].ttft_p50 / by[other].ttft_p50:.2f}x")

    equal = None
    if ours and seq:
        mismatched = [i for i, ids in seq.token_ids.items() if ours.token_ids.get(i) != ids]
        equal = not mismatched and ours.failures == 0
        for i in mismatched[:3]:
            a, b = seq.token_ids[i], ours.token_ids.get(i, [])
            pos = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  request {i}: first difference at generated token {pos} of {len(a)} (generate {a[pos:pos + 3]}, "
                  f"autoglm {b[pos:pos + 3]})")
        print(f"greedy equality (autoglm vs sequential generate, fp32, {len(seq.token_ids)} prompts): "
              f"{'PASS' if equal else 'FAIL'}" + (f" ({len(mismatched)} differ, e.g. request {mismatched[0]})"
                                                   if mismatched else ""))
    if args.json:
        payload = {"config": {"model_dir": str(model_dir), "requests": n, "clients": clients, "seed": args.seed,
                              "max_batch_size": args.max_batch_size, "max_batch_tokens": args.max_batch_tokens,
                              "cb_num_blocks": args.cb_num_blocks, "torch_threads": torch.get_num_threads()},
                   "results": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in results],
                   "ratios": ratios, "greedy_equal": equal,
                   "ttft_p99_over_p50": (ours.ttft_p99 / ours.ttft_p50) if ours and ours.ttft_p50 else None}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0 if (equal is not False and all(r.failures == 0 for r in results)) else 1


if __name__ == "__main__":
    sys.exit(main())
