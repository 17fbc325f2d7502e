"""The Open-AutoGLM phone-agent workload on a vision-language model, on CPU.

    .venv/bin/python bench/bench_runtime_vl.py [--quick] [--agents 8] [--steps 3] [--json out.json]

Workload (deterministic for a seed): the `small-vl` model (GLM-4.1V-shaped, random weights, fp32,
CPU; made in .cache/models/small-vl if missing). `--agents` agents run concurrently; each does
`--steps` steps one after the other (closed loop). A step is the phone agent's request: a system
prompt, the earlier steps as text (old screenshots stripped, as the agent does), and one fresh
1080x2400 PNG screenshot before the step's text; `temperature 0, top_p 0.85, frequency_penalty 0.2`,
exactly `--new-tokens` tokens (EOS ignored in every system).

Systems:
  1. sequential `generate` -- `Glm4vForConditionalGeneration.generate` per request, one after the
     other, with the same image preprocessing and the OpenAI frequency penalty as a logits processor.
  2. transformers serve    -- `transformers serve --continuous-batching` over HTTP, same client and
     workload (needs torchvision, in the `bench` extra, for Glm4v's processor); reported as not
     serving this model type when it cannot.
  3. autoglm-runtime serve -- over HTTP with the real `openai` client, streaming; TTFT = first
     content chunk. Its greedy token ids are checked against system 1 (PASS/FAIL).
  4. autoglm, cached image -- the same agents, but every step re-sends the screenshot of the
     previous step (an unchanged screen): the encoder cache serves the image (encoder skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "bench"))

from bench_runtime import ServerProcess, _pct, free_port  # noqa: E402

SYSTEM = (
    "You are a phone-operating agent. You see the current screen and the task. Think step by step "
    "inside <think></think>, then answer with do(action=...) or finish(message=...). "
) * 3
TASKS = [
    "open the settings app and turn on wifi",
    "search the market for a red kettle",
    "send a message to mom",
    "set an alarm for seven",
    "find the nearest coffee shop",
    "play the latest podcast episode",
    "check the weather for tomorrow",
    "order a taxi to the airport",
]


@dataclass
class Step:
    agent: int
    step: int
    messages: list[dict]
    png: bytes = field(repr=False)


@dataclass
class Result:
    system: str
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    e2e_p50: float | None = None
    note: str = ""


def _result(system: str, wall: float, records: list[dict], note: str = "") -> Result:
    """Throughput and latency of one system's run over the HTTP driver's records."""
    total = sum(r["tokens"] for r in records)
    ttfts = [r["ttft"] for r in records]
    return Result(system, wall, total, total / wall, _pct(ttfts, 0.5), _pct(ttfts, 0.99),
                  _pct([r["e2e"] for r in records], 0.5), note=note)


def screenshot(seed: int, w: int = 1080, h: int = 2400) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (245, 245, 245))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = rng.randrange(w - 100), rng.randrange(h - 60)
        d.rectangle(
            (x, y, x + rng.randint(60, 400), y + rng.randint(40, 160)), fill=tuple(rng.randrange(256) for _ in range(3))
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def workload(agents: int, steps: int, seed: int, repeat_image: bool) -> list[list[Step]]:
    out = []
    for a in range(agents):
        history: list[dict] = [{"role": "system", "content": SYSTEM}]
        task = TASKS[a % len(TASKS)]
        seq = []
        for s in range(steps):
            png = screenshot(seed * 1000 + a * 100 + (s - 1 if repeat_image and s > 0 else s))
            text = f"Task: {task}. Step {s + 1}. ** Screen Info ** current app: launcher"
            user = {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
                    },
                    {"type": "text", "text": text},
                ],
            }
            seq.append(Step(a, s, history + [user], png))
            # The agent keeps the step as text only, with a (fixed, for determinism) answer.
            history = history + [
                {"role": "user", "content": [{"type": "text", "text": text}]},
                {
                    "role": "assistant",
                    "content": f'<think>step {s + 1}</think><answer>do(action="Tap", element=[{100 * s},{200 * s}])',
                },
            ]
        out.append(seq)
    return out


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from autoglm_runtime.modelmaker_vl import make_vl_model

        print(f"making the small-vl model in {path} ...", flush=True)
        make_vl_model("small-vl", path)
    return path


# ------------------------------------------------------------------ systems


def run_sequential(model_dir: Path, plan: list[list[Step]], new_tokens: int) -> tuple[Result, dict]:
    import torch
    from transformers import LogitsProcessor

    from autoglm_runtime.loader import load_model
    from autoglm_runtime.multimodal import MediaLimits, chat_prompt_with_images
    from autoglm_runtime.vision import VisionLanguage

    class FrequencyPenalty(LogitsProcessor):
        def __init__(self, prompt_len: int, penalty: float) -> None:
            self.prompt_len, self.penalty = prompt_len, penalty

        def __call__(self, input_ids, scores):
            out = input_ids[:, self.prompt_len :]
            counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
            return scores - self.penalty * counts

    loaded = load_model(model_dir, dtype="float32", device="cpu")
    vl = VisionLanguage(loaded.model, loaded.tokenizer, loaded.image_processor)
    image_id = loaded.model.config.image_token_id
    ids_by_key, total, lat = {}, 0, []
    t0 = time.perf_counter()
    for seq in plan:
        for st in seq:
            t = time.perf_counter()
            ids, mm = asyncio.run(chat_prompt_with_images(vl, loaded.tokenizer, st.messages, MediaLimits()))
            ids_t = torch.tensor([ids])
            out = loaded.model.generate(
                ids_t,
                attention_mask=torch.ones_like(ids_t),
                pixel_values=mm.pixel_values,
                image_grid_thw=mm.image_grid_thw,
                mm_token_type_ids=(ids_t == image_id).long(),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=[FrequencyPenalty(len(ids), 0.2)],
            )
            gen = out[0, len(ids) :].tolist()
            ids_by_key[(st.agent, st.step)] = gen
            total += len(gen)
            lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return Result("1 sequential generate", wall, total, total / wall, e2e_p50=_pct(lat, 0.5)), ids_by_key


def encoder_cost(model_dir: Path, plan: list[list[Step]]) -> str:
    """What the encoder cache saves per screenshot: the vision encoder cold vs a cache hit."""
    import torch

    from autoglm_runtime.loader import load_model
    from autoglm_runtime.multimodal import MediaLimits, chat_prompt_with_images
    from autoglm_runtime.vision import VisionLanguage

    loaded = load_model(model_dir, dtype="float32", device="cpu")
    vl = VisionLanguage(loaded.model, loaded.tokenizer, loaded.image_processor)
    st = plan[0][0]
    cold, hit = [], []
    for _ in range(3):
        vl.cache = type(vl.cache)(vl.cache.max_bytes)
        for bucket in (cold, hit):  # decode + image processor + vision encoder
            t = time.perf_counter()
            ids, mm = asyncio.run(chat_prompt_with_images(vl, loaded.tokenizer, st.messages, MediaLimits()))
            vl.encode([mm], torch.device("cpu"), torch.float32)
            bucket.append(time.perf_counter() - t)
    n_img = sum(mm.tokens_per_image)
    return (
        f"one 1080x2400 screenshot = {n_img} image tokens of a {len(ids)}-token prompt; PNG decode + image "
        f"processor + vision encoder {min(cold) * 1000:.0f} ms cold, {min(hit) * 1000:.0f} ms with the encoder "
        f"cache (PNG decode only)"
    )


async def _drive(
    base: str, plan: list[list[Step]], new_tokens: int, model: str = "small-vl", extra_body: dict | None = None
) -> tuple[float, list[dict]]:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    records: list[dict] = []
    extra = extra_body if extra_body is not None else {"ignore_eos": True, "return_token_ids": True}

    async def agent(seq: list[Step]) -> None:
        for st in seq:
            t = time.perf_counter()
            ttft, text, ids, usage = None, "", [], None
            stream = await client.chat.completions.create(
                model=model,
                messages=st.messages,
                stream=True,
                max_tokens=new_tokens,
                temperature=0.0,
                top_p=0.85,
                frequency_penalty=0.2,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
            async for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                c = chunk.choices[0]
                if c.delta.content and ttft is None:
                    ttft = time.perf_counter() - t
                text += c.delta.content or ""
                ids += (c.model_extra or {}).get("token_ids") or []
            records.append(
                {
                    "key": (st.agent, st.step),
                    "ttft": ttft or (time.perf_counter() - t),
                    "e2e": time.perf_counter() - t,
                    "ids": ids,
                    "tokens": len(ids) or (usage.completion_tokens if usage else 0),
                }
            )

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(agent(seq) for seq in plan))
    finally:
        await client.close()
    return time.perf_counter() - t0, records


def run_autoglm(model_dir: Path, plans: dict[str, list[list[Step]]], new_tokens: int, args, logdir: Path):
    port = free_port()
    argv = [
        str(VENV_BIN / "autoglm-runtime"),
        "serve",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(args.agents),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-model-len",
        "4096",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--served-model-name",
        "small-vl",
        "--log-level",
        "warning",
    ]
    srv = ServerProcess(argv, port, logdir / "autoglm-vl.log")
    results = {}
    try:
        srv.wait_ready("/ready")
        base = f"http://127.0.0.1:{port}"
        warm = workload(1, 1, seed=999, repeat_image=False)
        asyncio.run(_drive(base, warm, 2))
        for name, plan in plans.items():
            wall, records = asyncio.run(_drive(base, plan, new_tokens))
            results[name] = (_result(name, wall, records), {r["key"]: r["ids"] for r in records})
    finally:
        srv.stop()
    return results


def run_hf_serve(model_dir: Path, plan: list[list[Step]], new_tokens: int, args, logdir: Path) -> Result | str:
    """`transformers serve --continuous-batching` on the same model and workload (its per-request
    `generation_config` forces exactly `new_tokens`); a string saying why when it cannot serve it."""
    port = free_port()
    argv = [
        str(VENV_BIN / "transformers"),
        "serve",
        str(model_dir),
        "--continuous-batching",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--attn-implementation",
        "sdpa",
        "--cb-num-blocks",
        "512",
        "--cb-max-batch-tokens",
        str(args.max_batch_tokens),
    ]
    srv = ServerProcess(argv, port, logdir / "hf-serve-vl.log", {**os.environ, "HF_HUB_OFFLINE": "1"})
    extra = {
        "generation_config": json.dumps(
            {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        )
    }
    try:
        srv.wait_ready("/health", timeout=180)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(_drive(base, workload(1, 1, seed=999, repeat_image=False), 2, str(model_dir), extra))
        wall, records = asyncio.run(_drive(base, plan, new_tokens, str(model_dir), extra))
    except Exception as exc:  # noqa: BLE001 - reported as the outcome
        lines = srv.log.read_text(errors="replace").splitlines() if srv.log.exists() else []
        why = [ln.strip() for ln in lines if "Error" in ln or "requires" in ln][-2:]
        return f"does not serve it ({type(exc).__name__}: {str(exc)[:120]}): {' / '.join(why)[:300]}"
    finally:
        srv.stop()
    return _result("2 transformers serve --continuous-batching", wall, records,
                   note="frequency_penalty sent; whether it applies it is not checked")


# ------------------------------------------------------------------ report


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 agents x 2 steps, 8 tokens: a smoke run")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "models" / "small-vl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of systems to skip: 1,2,3,4")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.agents, args.steps, args.new_tokens = 4, 2, 8
    skip = set(filter(None, args.skip.split(",")))
    model_dir = ensure_model(args.model_dir)
    logdir = REPO / ".cache" / "bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    fresh = workload(args.agents, args.steps, args.seed, repeat_image=False)
    cached = workload(args.agents, args.steps, args.seed + 1, repeat_image=True)
    print(
        f"workload: {args.agents} agents x {args.steps} steps, one 1080x2400 screenshot per step, "
        f"{args.new_tokens} new tokens, model {model_dir}",
        flush=True,
    )

    results: list[Result] = []
    notes: list[str] = []
    ref_ids = None
    if "1" not in skip:
        print("running 1 sequential generate ...", flush=True)
        res, ref_ids = run_sequential(model_dir, fresh, args.new_tokens)
        results.append(res)
    notes.append(encoder_cost(model_dir, fresh))
    if "2" not in skip:
        print("running 2 transformers serve --continuous-batching ...", flush=True)
        hf = run_hf_serve(model_dir, fresh, args.new_tokens, args, logdir)
        if isinstance(hf, Result):
            results.append(hf)
        else:
            notes.append(f"transformers serve --continuous-batching on small-vl: {hf}")
    plans = {}
    if "3" not in skip:
        plans["3 autoglm-runtime serve"] = fresh
    if "4" not in skip:
        plans["4 autoglm, unchanged screen (encoder cache)"] = cached
    if plans:
        print("running autoglm-runtime serve ...", flush=True)
        for name, (res, ids) in run_autoglm(model_dir, plans, args.new_tokens, args, logdir).items():
            results.append(res)
            if name.startswith("3") and ref_ids is not None:
                same = all(ids.get(k) == v for k, v in ref_ids.items())
                notes.append(f"greedy token ids of autoglm == sequential generate: {'PASS' if same else 'FAIL'}")

    print()
    print("| system | wall | output tokens | tokens/s | TTFT p50 | TTFT p99 | latency p50 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.system} | {r.wall_s:.2f}s | {r.output_tokens} | {r.tokens_per_s:.1f} | {_f(r.ttft_p50)} | "
            f"{_f(r.ttft_p99)} | {_f(r.e2e_p50)} |"
        )
    for n in notes:
        print(f"- {n}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": [asdict(r) for r in results],
                    "notes": notes,
                },
                indent=2,
            )
        )
    return 0 if not any("FAIL" in n for n in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
