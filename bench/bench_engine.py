"""Engine-alone microbenchmark: continuous-batching engine vs one left-padded `model.generate`
batch vs sequential `generate`, greedy, on the same prompts. Prints tokens/s and ratios.

    .venv/bin/python bench/bench_engine.py --model /tmp/small --requests 192 --concurrency 64

Tokens counted: the tokens each request asked for (max_tokens, eos ignored everywhere), so the
padded batch gets no credit for the extra tokens it generates for short requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import torch

from autoglm_runtime.engine import Engine
from autoglm_runtime.loader import load_model
from autoglm_runtime.modelmaker import _WORDS, make_model, num_parameters
from autoglm_runtime.sampling import SamplingParams


def workload(tokenizer, n: int, min_words: int, max_words: int, min_new: int, max_new: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))
        out.append((tokenizer.encode(text, add_special_tokens=False), rng.randint(min_new, max_new)))
    return out


async def run_engine(loaded, work, concurrency: int, max_batch_tokens: int) -> tuple[float, list[list[int]]]:
    steps: list = []
    eng = Engine(
        loaded, max_batch_size=concurrency, max_queue=len(work) + 1, max_batch_tokens=max_batch_tokens,
        max_model_len=1024, on_step=steps.append,
    )
    await eng.start()
    sem = asyncio.Semaphore(concurrency)
    results: list[list[int]] = [[] for _ in work]

    async def one(i, ids, n):
        async with sem:
            async for out in eng.generate(str(i), ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
                results[i] += out.new_token_ids

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, ids, n) for i, (ids, n) in enumerate(work)))
    dt = time.perf_counter() - t0
    await eng.stop()
    busy = sum(s.step_seconds for s in steps)
    pre = sum(s.num_prefill_tokens for s in steps)
    dec = sum(s.num_decode_tokens for s in steps)
    print(f"  engine: {len(steps)} steps, forward+sample {busy:.2f}s of {dt:.2f}s wall, prefill tokens {pre}, decode tokens {dec}, "
          f"mean decode batch {dec / max(1, sum(1 for s in steps if s.num_decode_tokens)):.1f}")
    return dt, results


@torch.inference_mode()
def run_padded(model, work, pad_id: int, batch: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    results = []
    for b in range(0, len(work), batch):
        chunk = work[b : b + batch]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        max_new = max(n for _, n in chunk)
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
            do_sample=False, pad_token_id=pad_id, eos_token_id=None,
        )
        results += [out[i, width : width + n].tolist() for i, (_, n) in enumerate(chunk)]
    return time.perf_counter() - t0, results


@torch.inference_mode()
def run_sequential(model, work, pad_id: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    results = []
    for ids, n in work:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        results.append(out[0, len(ids) :].tolist())
    return time.perf_counter() - t0, results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="model dir (default: build the small model in a temp dir)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--padded-batch", type=int, default=0, help="padded generate batch size (0: all requests at once)")
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--min-words", type=int, default=16)
    ap.add_argument("--max-words", type=int, default=160)
    ap.add_argument("--min-new", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=8, help="requests to time sequentially (0: skip)")
    ap.add_argument("--skip-padded", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or make_model(args.size, Path(tempfile.mkdtemp()) / args.size)
    engine_model = load_model(model_dir, dtype="float32", device="cpu")
    ref = load_model(model_dir, dtype="float32", device="cpu")
    work = workload(ref.tokenizer, args.requests, args.min_words, args.max_words, args.min_new, args.max_new)
    useful = sum(n for _, n in work)
    plen = [len(ids) for ids, _ in work]
    print(f"model {model_dir} params={num_parameters(model_dir) / 1e6:.1f}M threads={torch.get_num_threads()}")
    print(f"{len(work)} requests, prompt tokens {min(plen)}-{max(plen)} (mean {sum(plen) / len(plen):.0f}), {useful} output tokens")

    # warm-up
    asyncio.run(run_engine(engine_model, work[:4], 4, args.max_batch_tokens))
    dt_e, res_e = asyncio.run(run_engine(engine_model, work, args.concurrency, args.max_batch_tokens))
    print(f"engine   (concurrency {args.concurrency}): {dt_e:7.2f} s  {useful / dt_e:8.1f} tok/s")
    if not args.skip_padded:
        batch = args.padded_batch or len(work)
        dt_p, res_p = run_padded(ref.model, work, ref.tokenizer.pad_token_id, batch)
        same = sum(a == b for a, b in zip(res_e, res_p))
        print(f"padded generate (batch {batch}): {dt_p:7.2f} s  {useful / dt_p:8.1f} tok/s   identical outputs {same}/{len(work)}")
        print(f"ratio engine / padded = {dt_p / dt_e:.2f}")
    if args.sequential:
        k = args.sequential
        dt_s, res_s = run_sequential(ref.model, work[:k], ref.tokenizer.pad_token_id)
        seq_tps = sum(n for _, n in work[:k]) / dt_s
        same = sum(a == b for a, b in zip(res_e[:k], res_s))
        print(f"sequential generate ({k} requests): {seq_tps:8.1f} tok/s   identical outputs {same}/{k}")
        print(f"ratio engine / sequential = {useful / dt_e / seq_tps:.2f}")


if __name__ == "__main__":
    main()
