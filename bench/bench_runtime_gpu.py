"""Decode throughput of the autoglm Engine on one GPU at batch 1..128, against the memory-bandwidth bound.

    make bench-runtime-gpu                                    # small GLM (~26M params), bf16
    .venv/bin/python bench/bench_runtime_gpu.py --synthetic-params 1e9 --dtype bfloat16 --json out.json
    .venv/bin/python bench/bench_runtime_gpu.py --model /models/glm-4-9b --dtype bfloat16
    .venv/bin/python bench/bench_runtime_gpu.py --device cpu --dtype float32 --size tiny \\
        --batches 1,2,4 --new-tokens 8                        # CPU smoke run

What is measured (Engine used directly, no HTTP; greedy, ignore_eos):
  For every batch size B: B requests of exactly --prompt-tokens prompt tokens and --new-tokens new
  tokens are submitted at once (after a short warm-up run at the same B). The engine's `on_step`
  hook timestamps every step; a *decode step* is a step with no prefill tokens and all B sequences
  decoding. Per B:
    step ms     mean wall time of one full engine step (schedule + prepare + forward + sample + the
                host sync + detokenize), i.e. the interval between consecutive decode steps
    fwd ms      mean of the engine's own step_seconds (forward + sample + `.tolist()`)
    tok/s       decode throughput = B / step time
    e2e tok/s   B x new tokens / wall time of the whole batch (prefill included)
    bound ms    bytes moved per decode step / measured bandwidth, where
                bytes = weight bytes read (every parameter except the input-embedding table, which
                is gathered B rows at a time, when it is not tied to the LM head)
                      + KV bytes read = layers x 2 x kv_heads x head_dim x context x B x dtype size,
                context = prompt tokens + new tokens / 2 (mean over the decode steps)
    % bound     bound ms / step ms x 100 (100 % = running at the memory-bandwidth roofline)
  Bandwidth: a large device-to-device copy (--bw-bytes, default 1 GiB) timed with CUDA events,
  bandwidth = 2 x bytes / time (read + write); printed next to the spec value for known GPUs.
  Sync check (CUDA only): a short extra run under `torch.cuda.set_sync_debug_mode("warn")` counts
  the synchronizing CUDA calls per engine step (the engine claims exactly one, its `.tolist()`).

Models: `--size tiny|small` builds a random-weight GLM with autoglm_runtime.modelmaker into the cache
dir (default .cache/models/<size>); `--synthetic-params 1e9` builds a larger random-weight GLM
(GlmConfig sized here to about that many parameters) into the cache dir; `--model DIR` uses a real
checkpoint. Every model is loaded through autoglm_runtime.loader.load_model.

Without CUDA (and without --device cpu) the script exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))  # run from a checkout even without the editable install

import torch  # noqa: E402

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.loader import ModelLoadError, load_model  # noqa: E402
from autoglm_runtime.modelmaker import _WORDS, make_model, make_tokenizer  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402

NO_CUDA_MESSAGE = "no CUDA device; use --device cpu for a smoke run"

# Peak DRAM bandwidth from the vendors' spec sheets, GB/s (1e9 bytes/s). First match wins.
SPEC_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100.*80GB", 2000.0),
    (r"A100", 1555.0),  # 40GB
    (r"A10G", 600.0),
    (r"\bL4\b", 300.0),
]


def spec_bandwidth(gpu_name: str) -> float | None:
    for pattern, gbps in SPEC_BANDWIDTH_GBPS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return gbps
    return None


# ---------------------------------------------------------------------------------------- models
def synthetic_config_kwargs(target_params: float, vocab: int) -> dict:
    """GlmConfig fields for a GLM of about `target_params` parameters (GQA, head_dim 128)."""
    if target_params < 4e8:
        hidden, heads, kv, inter = 1024, 8, 2, 2816
    elif target_params < 3e9:
        hidden, heads, kv, inter = 2048, 16, 4, 5632
    else:  # GLM-4-9B-like layer
        hidden, heads, kv, inter = 4096, 32, 2, 13696
    hd = hidden // heads
    per_layer = (
        hidden * heads * hd + heads * hd  # q_proj (+bias)
        + 2 * (hidden * kv * hd + kv * hd)  # k_proj, v_proj (+bias)
        + heads * hd * hidden  # o_proj
        + 3 * hidden * inter  # gate_up_proj, down_proj
        + 2 * hidden  # two RMSNorms
    )
    outside = 2 * vocab * hidden + hidden  # embeddings, LM head, final norm
    layers = max(1, round((target_params - outside) / per_layer))
    return dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        max_position_embeddings=8192,
    )


def build_synthetic(target_params: float, cache_dir: Path, device: torch.device, seed: int = 0) -> Path:
    """A random-weight GLM of about `target_params` parameters, saved as safetensors (bf16)."""
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    tokenizer = make_tokenizer()
    vocab = (len(tokenizer) + 63) // 64 * 64
    kw = synthetic_config_kwargs(target_params, vocab)
    name = f"glm-synth-h{kw['hidden_size']}-l{kw['num_hidden_layers']}-i{kw['intermediate_size']}-v{vocab}"
    out = cache_dir / name
    if (out / "config.json").is_file():
        return out
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<sop>", "<|endoftext|>")}
    config = GlmConfig(
        vocab_size=vocab,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<sop>"],
        eos_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        attention_bias=True,
        **kw,
    )
    print(f"building synthetic GLM {name} into {out} ...", flush=True)
    t0 = time.perf_counter()
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the GPU when there is one: much faster
            model = GlmForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<sop>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<pad>"], do_sample=False
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tmp.replace(out)
    print(f"  built in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def build_size(size: str, cache_dir: Path) -> Path:
    out = cache_dir / size
    if (out / "config.json").is_file():
        return out
    print(f"building the {size} model into {out} ...", flush=True)
    tmp = cache_dir / f".{size}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_model(size, tmp)  # type: ignore[arg-type]
    tmp.replace(out)
    return out


def model_geometry(loaded) -> dict:
    cfg = loaded.config.get_text_config() if hasattr(loaded.config, "get_text_config") else loaded.config
    heads = cfg.num_attention_heads
    model = loaded.model
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb.data_ptr()
    # Unique storages only (tied weights are one tensor).
    seen, unique_bytes = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            unique_bytes += p.numel() * p.element_size()
    weight_read = unique_bytes - (0 if tied else emb.numel() * emb.element_size())
    return dict(
        params=sum(p.numel() for p in params),
        param_bytes=param_bytes,
        weight_bytes_read=weight_read,  # + B embedding rows per step (added per batch)
        embedding_row_bytes=emb.shape[1] * emb.element_size(),
        tied_embeddings=tied,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab=emb.shape[0],
        dtype_bytes=loaded.dtype.itemsize,
    )


# ---------------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy: 2 x bytes (read + write) / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes * iters / seconds


# ---------------------------------------------------------------------------------------- runs
def make_prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            text = " ".join(rng.choice(_WORDS) for _ in range(64))
            ids += tokenizer.encode(text, add_special_tokens=False)
        out.append(ids[:length])
    return out


class StepLog:
    """on_step hook: (perf_counter at the end of the step, StepStats)."""

    def __init__(self) -> None:
        self.records: list = []
        self.calls = 0  # all hook calls so far (the engine counts its steps in num_steps)

    def __call__(self, stats) -> None:
        self.records.append((time.perf_counter(), stats))
        self.calls += 1

    async def settle(self, eng: Engine) -> None:
        """Wait for the hook of the engine's last step (it runs after the outputs are delivered)."""
        deadline = time.monotonic() + 10
        while self.calls < eng.num_steps and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)


_counter = 0


async def run_batch(eng: Engine, log: StepLog, prompts: list[list[int]], batch: int, new_tokens: int) -> dict:
    global _counter
    _counter += 1
    tag = _counter
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    counts = [0] * batch

    async def one(i: int) -> None:
        async for out in eng.generate(f"r{tag}-{i}", prompts[i], params):
            counts[i] += len(out.new_token_ids)

    await log.settle(eng)
    log.records = []
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    wall = time.perf_counter() - t0
    await log.settle(eng)
    recs = log.records
    log.records = []
    intervals, fwd = [], []
    for i in range(1, len(recs)):
        st = recs[i][1]
        if st.num_prefill_tokens == 0 and st.num_decode_tokens == batch:
            intervals.append(recs[i][0] - recs[i - 1][0])
            fwd.append(st.step_seconds)
    return dict(wall_s=wall, tokens=sum(counts), steps=len(recs), intervals=intervals, forward=fwd)


def row_for(batch: int, res: dict, geo: dict, prompt_tokens: int, new_tokens: int, bw: float, spec_bw: float | None) -> dict:
    context = prompt_tokens + new_tokens / 2
    kv_bytes = geo["layers"] * 2 * geo["kv_heads"] * geo["head_dim"] * context * batch * geo["dtype_bytes"]
    weight_bytes = geo["weight_bytes_read"] + batch * geo["embedding_row_bytes"]
    total = weight_bytes + kv_bytes
    bound_ms = total / bw * 1e3
    iv = res["intervals"]
    step_ms = statistics.fmean(iv) * 1e3 if iv else float("nan")
    row = dict(
        batch=batch,
        tokens_per_s=batch / (step_ms / 1e3) if iv else float("nan"),
        e2e_tokens_per_s=res["tokens"] / res["wall_s"],
        step_ms=step_ms,
        step_ms_p50=statistics.median(iv) * 1e3 if iv else float("nan"),
        forward_ms=statistics.fmean(res["forward"]) * 1e3 if iv else float("nan"),
        bound_ms=bound_ms,
        pct_of_bound=100 * bound_ms / step_ms if iv else float("nan"),
        bound_spec_ms=total / (spec_bw * 1e9) * 1e3 if spec_bw else None,
        bytes_per_step=total,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        context=context,
        decode_steps=len(iv),
        steps=res["steps"],
        generated_tokens=res["tokens"],
        wall_s=res["wall_s"],
    )
    return row


async def sync_check(eng: Engine, log: StepLog, prompts, batch: int, new_tokens: int) -> dict:
    """Count synchronizing CUDA calls per engine step with torch's sync debug mode."""
    marker = "synchronizing CUDA operation"

    def probe_in_thread(box: list) -> None:
        box.append(torch.zeros(1, device=eng.device).add_(1).item())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            # Probe: one known sync in another thread must be seen, or the count means nothing.
            box: list = []
            t = threading.Thread(target=probe_in_thread, args=(box,))
            t.start()
            t.join()
            probe = sum(marker in str(w.message) for w in caught)
            caught.clear()
            res = await run_batch(eng, log, prompts, batch, new_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if marker in str(w.message)]
    if probe < 1:
        return dict(ok=None, note="sync debug mode warnings were not captured; no count", batch=batch)
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    per_step = len(syncs) / max(1, res["steps"])
    return dict(
        ok=len(syncs) == res["steps"],
        batch=batch,
        steps=res["steps"],
        syncs=len(syncs),
        syncs_per_step=per_step,
        locations=dict(where.most_common()),
    )


# ---------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a model directory (real checkpoint)")
    src.add_argument("--synthetic-params", type=float, metavar="N",
                     help="build a random-weight GLM of about N parameters (e.g. 1e9) into the cache dir")
    ap.add_argument("--size", default="small", choices=["tiny", "small"], help="modelmaker size (default small)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda (exits 2 when there is none)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the warm-up run at each batch")
    ap.add_argument("--bw-bytes", type=float, help="copy size for the bandwidth test (default 1 GiB on CUDA, 64 MiB on CPU)")
    ap.add_argument("--bw-iters", type=int, default=20)
    ap.add_argument("--no-sync-check", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (CPU)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    try:
        args.batch_list = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error("--batches needs positive integers")
    if args.new_tokens < 3:
        ap.error("--new-tokens must be >= 3 (decode steps are measured after the prefill step)")
    if args.prompt_tokens < 1:
        ap.error("--prompt-tokens must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None or args.device == "cuda":
        if not torch.cuda.is_available():
            print(NO_CUDA_MESSAGE, file=sys.stderr)
            return 2
        args.device = "cuda"
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec_gbps = spec_bandwidth(gpu_name) if device.type == "cuda" else None

    # Bandwidth first, while the device memory is empty.
    nbytes = int(args.bw_bytes or (1 << 30 if device.type == "cuda" else 64 << 20))
    iters = args.bw_iters if device.type == "cuda" else min(args.bw_iters, 5)
    bw = measure_bandwidth(device, nbytes, iters)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = args.model
    elif args.synthetic_params:
        model_dir = build_synthetic(args.synthetic_params, args.cache_dir, device)
    else:
        model_dir = build_size(args.size, args.cache_dir)

    max_batch = max(args.batch_list)
    max_len = args.prompt_tokens + max(args.new_tokens, args.warmup_tokens) + 8
    try:
        loaded = load_model(model_dir, dtype=dtype, device=device.type)
        geo = model_geometry(loaded)
        log = StepLog()
        # Whole batch prefilled in one step, so every sequence then decodes in lockstep.
        eng = Engine(
            loaded,
            max_batch_size=max_batch,
            max_queue=max_batch + 1,
            max_batch_tokens=max(2048, max_batch * args.prompt_tokens),
            max_model_len=max_len,
            on_step=log,
            num_threads=args.threads or None,
            seed=0,
        )
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if eng.max_model_len < args.prompt_tokens + args.new_tokens:
        print(f"error: the model accepts {eng.max_model_len} positions; lower --prompt-tokens/--new-tokens", file=sys.stderr)
        return 2

    print(f"device   {gpu_name} ({device.type})  dtype {dtype}  torch {torch.__version__}")
    print(f"model    {model_dir}  params {geo['params'] / 1e6:.1f}M  layers {geo['layers']}  hidden {geo['hidden']}  "
          f"heads {geo['heads']}/{geo['kv_heads']} kv  head_dim {geo['head_dim']}  vocab {geo['vocab']}")
    print(f"         weights read per decode step {geo['weight_bytes_read'] / 1e6:.1f} MB "
          f"(params {geo['param_bytes'] / 1e6:.1f} MB, input embedding {'tied' if geo['tied_embeddings'] else 'excluded'})")
    spec_txt = f"   spec {spec_gbps:.0f} GB/s ({100 * bw / 1e9 / spec_gbps:.0f}% of spec)" if spec_gbps else ""
    print(f"bandwidth measured {bw / 1e9:.0f} GB/s (copy of {nbytes / 2**20:.0f} MiB x {iters}){spec_txt}")
    print(f"workload prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy, ignore_eos), "
          f"batches {','.join(map(str, args.batch_list))}")
    print(flush=True)

    prompts = make_prompts(loaded.tokenizer, max_batch, args.prompt_tokens)
    rows: list[dict] = []
    sync: dict | None = None

    async def sweep() -> None:
        nonlocal sync
        await eng.start()
        try:
            hdr = f"{'batch':>5} {'tok/s':>10} {'e2e tok/s':>10} {'step ms':>8} {'p50 ms':>8} {'fwd ms':>8} {'bound ms':>8} {'% bound':>8}"
            if spec_gbps:
                hdr += f" {'spec-bound ms':>13}"
            print(hdr)
            for b in args.batch_list:
                if args.warmup_tokens > 0:
                    await run_batch(eng, log, prompts, b, max(3, args.warmup_tokens))
                res = await run_batch(eng, log, prompts, b, args.new_tokens)
                row = row_for(b, res, geo, args.prompt_tokens, args.new_tokens, bw, spec_gbps)
                rows.append(row)
                line = (f"{b:>5} {row['tokens_per_s']:>10.1f} {row['e2e_tokens_per_s']:>10.1f} {row['step_ms']:>8.3f} "
                        f"{row['step_ms_p50']:>8.3f} {row['forward_ms']:>8.3f} {row['bound_ms']:>8.3f} {row['pct_of_bound']:>7.1f}%")
                if spec_gbps:
                    line += f" {row['bound_spec_ms']:>13.3f}"
                print(line, flush=True)
            if device.type == "cuda" and not args.no_sync_check:
                sb = min(4, max_batch)
                sync = await sync_check(eng, log, prompts, sb, min(16, args.new_tokens))
                if sync.get("ok") is None:
                    print(f"\nsync check: {sync['note']}")
                else:
                    verdict = "OK (one host sync per step)" if sync["ok"] else "MORE THAN ONE host sync per step"
                    print(f"\nsync check (batch {sb}): {sync['syncs']} synchronizing CUDA calls in {sync['steps']} steps "
                          f"= {sync['syncs_per_step']:.2f}/step -> {verdict}; at {sync['locations']}")
        finally:
            await eng.stop()

    asyncio.run(sweep())

    if args.json:
        result = dict(
            device=device.type,
            gpu_name=gpu_name,
            dtype=dtype,
            torch=torch.__version__,
            model=dict(dir=str(model_dir), **geo),
            bandwidth=dict(
                measured_GBps=bw / 1e9,
                spec_GBps=spec_gbps,
                copy_bytes=nbytes,
                iters=iters,
            ),
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            rows=[{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
            sync_check=sync,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
