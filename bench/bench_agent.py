"""The Open-AutoGLM phone agent's own loop against the runtime: TTFT by step, prefix reuse, KV capacity.

    .venv/bin/python bench/bench_agent.py [--agents 4] [--steps 6] [--json out.json] [--png docs/bench/agent-ttft.png]
    .venv/bin/python bench/bench_agent.py --capacity --server 'slots=<argv...>' --server 'paged=<argv...>'

Workload (seeded, synthetic, shaped as zai-org/Open-AutoGLM's `phone_agent/agent.py` and
`phone_agent/model/client.py` send it): N agents run at once, each K steps one after the other. The
system prompt is the real one's length (~3,400 characters, ~2,000 of them CJK) and starts with the date
(`今天的日期是: ...`). Every step sends the history plus one user message whose FIRST part is a fresh
1080x2400 PNG screenshot and whose text is the task (step 1) or `** Screen Info **` and the screen-info
JSON; after the answer the image is stripped from that message and the answer is re-added as
`<think>...</think><answer>...</answer>`. The answers are seeded text of realistic length (a 40-160
character CJK thought and a `do(action=...)`/`finish(message=...)` action), generated as exactly as many
tokens as they tokenize to (our `ignore_eos`; `generation_config` min/max for transformers serve): the
random-weight model's own output is noise and would not re-tokenize to itself. Between steps each agent
"acts on the phone" for a think time. Requests stream with the agent's sampling (temperature 0, top_p
0.85, frequency_penalty 0.2); unlike the agent we ask for `stream_options.include_usage` to read
`usage.prompt_tokens_details.cached_tokens`.

Model: `small-vl` (GLM-4.1V-shaped, random weights) with its image processor's `size.longest_edge` raised
so that one screenshot gives `--image-tokens` (default 1,200) merged image tokens -- the real
AutoGLM-Phone gives ~3,100; the model folder is `.cache/models/small-vl-agent-<tokens>` (the small-vl
weights linked, the processor setting rewritten).

Systems, in one run: our runtime with prefix caching on (its default), with `--no-prefix-caching`, and
`transformers serve --continuous-batching`. A system that cannot run (a flag the runtime does not accept,
a model type the peer does not serve) is reported as unavailable with the reason; nothing is estimated.
Reported per system and step index: TTFT p50/p99, prompt tokens, the tokens the step shares with its
agent's previous step (computed here with the model's own tokenizer and template), the tokens the server
reused (`cached_tokens`) and computed; tokens/s; the peak of the KV-block gauges on `/metrics`. A table
checks the issue's targets (reuse >= 95 % of the shared tokens from step 2; TTFT p50 over steps >= 3 at
most 0.6x of caching off and 0.5x of transformers serve) and a PNG plots TTFT by step.

Capacity mode (`--capacity`): every `--server LABEL=ARGV` (an autoglm-runtime command line, e.g. an
older commit's checkout with its slot cache, and the paged engine, both at the same KV memory) serves
`--capacity-agents` agents with no think time; reported: the most sequences running at once (sampled
from `autoglm_requests_running`), waiting, preemptions, TTFT, failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))
sys.path.insert(0, str(REPO / "bench"))

from bench_runtime import VENV_BIN, ServerProcess, _pct, free_port  # noqa: E402
from bench_runtime_vl import ensure_model, screenshot  # noqa: E402

PATCH_TOKEN_PIXELS = 28 * 28 * 2  # one merged image token: a 28x28 patch, counted over both temporal frames
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
CJK_PHRASES = [
    "根据当前屏幕", "判断下一步操作", "点击搜索框", "输入关键词", "返回上一级页面", "检查任务是否完成",
    "如果页面没有加载完成", "请等待", "滑动屏幕查找", "打开应用", "选择合适的选项", "确认订单信息",
    "在购物车中", "不要重复点击", "遇到登录页面", "执行结束操作", "注意价格和数量", "查看历史状态",
]
ASCII_RULES = [
    'do(action="Launch", app="xxx")', 'do(action="Tap", element=[x,y])', 'do(action="Type", text="xxx")',
    'do(action="Swipe", start=[x1,y1], end=[x2,y2])', 'do(action="Back")', 'do(action="Home")',
    'do(action="Wait", duration="x seconds")', 'finish(message="xxx")', "0-1000",
]
APPS = ["微信", "淘宝", "美团", "高德地图", "小红书", "京东", "抖音", "System Home"]
TASKS = ["打开美团搜索附近的咖啡店", "在淘宝上搜索红色水壶并加入购物车", "用微信给妈妈发消息说今晚回家吃饭",
         "打开高德地图导航到最近的地铁站", "在小红书搜索周末去哪儿玩", "在京东查看我的订单物流"]


# ------------------------------------------------------------------ workload


def system_prompt(rng: random.Random, today: date, chars: int = 3400, cjk: int = 2000) -> str:
    """The real prompt's shape: the date first, then rules mixing CJK prose and ASCII action syntax."""
    head = f"今天的日期是: {today.strftime('%Y年%m月%d日')} {WEEKDAYS[today.weekday()]}\n"
    lines, n_cjk, n = [head], sum(map(_is_cjk, head)), len(head)
    rule = 1
    while n < chars:
        if n_cjk < cjk * n / chars:
            body = "，".join(rng.choice(CJK_PHRASES) for _ in range(rng.randint(2, 5))) + "。"
        else:
            body = f"使用 {rng.choice(ASCII_RULES)} 时, coordinates are {rng.choice(ASCII_RULES)}."
        line = f"{rule}. {body}\n"
        rule += 1
        lines.append(line)
        n += len(line)
        n_cjk += sum(map(_is_cjk, line))
    return "".join(lines)


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def answer(rng: random.Random) -> str:
    think = "，".join(rng.choice(CJK_PHRASES) for _ in range(rng.randint(3, 12)))[: rng.randint(40, 160)]
    if rng.random() < 0.1:
        action = f'finish(message="{rng.choice(CJK_PHRASES)}")'
    else:
        action = f'do(action="Tap", element=[{rng.randrange(1000)},{rng.randrange(1000)}])'
    return f"<think>{think}</think><answer>{action}</answer>"


@dataclass
class Step:
    agent: int
    step: int  # 1-based, as the agent counts
    text: str
    png: bytes = field(repr=False)
    answer: str
    think_s: float


def plan(agents: int, steps: int, seed: int, think: tuple[float, float], system_chars: int = 3400
         ) -> tuple[str, list[list[Step]]]:
    rng = random.Random(seed)
    system = system_prompt(rng, date.today(), system_chars, system_chars * 2000 // 3400)
    out = []
    for a in range(agents):
        task = TASKS[(seed + a) % len(TASKS)]
        seq = []
        for k in range(1, steps + 1):
            info = json.dumps({"current_app": rng.choice(APPS)}, ensure_ascii=False)
            text = f"{task}\n\n{info}" if k == 1 else f"** Screen Info **\n\n{info}"
            seq.append(Step(a, k, text, screenshot(seed * 100_000 + a * 1000 + k), answer(rng), rng.uniform(*think)))
        out.append(seq)
    return system, out


def messages_of(system: str, seq: list[Step], k: int) -> list[dict]:
    """The agent's context at step k: earlier steps as text plus their answers, then step k with its image."""
    msgs: list[dict] = [{"role": "system", "content": system}]
    for st in seq[: k - 1]:
        msgs.append({"role": "user", "content": [{"type": "text", "text": st.text}]})
        msgs.append({"role": "assistant", "content": st.answer})
    st = seq[k - 1]
    url = "data:image/png;base64," + base64.b64encode(st.png).decode()
    msgs.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": st.text}]})
    return msgs


class PromptCounter:
    """Prompt token ids as the server makes them (its chat template, `<|image|>` expanded per image)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.image_id = self.tok.convert_tokens_to_ids("<|image|>")
        proc = AutoImageProcessor.from_pretrained(model_dir)
        from PIL import Image

        img = Image.open(io.BytesIO(screenshot(0))).convert("RGB")
        grid = proc(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
        self.image_tokens = grid[0] * grid[1] * grid[2] // 4
        self.longest_edge = proc.size["longest_edge"]

    def ids(self, msgs: list[dict]) -> list[int]:
        from autoglm_runtime.multimodal import MediaLimits, split_messages

        template, _ = split_messages(msgs, MediaLimits())
        text = self.tok.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
        out: list[int] = []
        for t in self.tok(text, add_special_tokens=False)["input_ids"]:
            out.extend([t] * self.image_tokens if t == self.image_id else [t])
        return out

    def answer_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def agent_model(base: Path, image_tokens: int, context: int) -> Path:
    """small-vl with an image processor that gives ~image_tokens merged tokens per 1080x2400 screenshot and a
    context of `context` positions (the byte-level test tokenizer spends 3 tokens on a CJK character)."""
    out = REPO / ".cache" / "models" / f"small-vl-agent-{image_tokens}-{context}"
    out.mkdir(parents=True, exist_ok=True)
    rewritten = ("preprocessor_config.json", "config.json")
    for f in base.iterdir():
        if f.name not in rewritten and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    proc = json.loads((base / "preprocessor_config.json").read_text())
    proc["size"] = {**proc.get("size", {}), "longest_edge": image_tokens * PATCH_TOKEN_PIXELS}
    (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = context  # plain RoPE: any position is defined
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ------------------------------------------------------------------ metrics scraping


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every sample per metric name (labels dropped): enough for one server, one model."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def pick(metrics: dict[str, float], *needles: str, exclude: tuple[str, ...] = ("_created",)) -> str | None:
    """The first metric name holding every needle (the KV-block gauges' exact names are the engine's)."""
    for name in sorted(metrics):
        if all(n in name for n in needles) and not any(e in name for e in exclude):
            return name
    return None


class Sampler:
    """Polls /metrics while a run goes on: peaks of the gauges, deltas of the counters."""

    def __init__(self, base: str, interval: float = 0.2) -> None:
        self.base, self.interval = base, interval
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.available = True

    async def scrape(self, client) -> dict[str, float]:
        r = await client.get(self.base + "/metrics")
        if r.status_code != 200:
            self.available = False
            return {}
        m = parse_metrics(r.text)
        for k, v in m.items():
            self.peak[k] = max(self.peak.get(k, v), v)
        return m

    async def run(self, stop: asyncio.Event) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            try:
                self.first = await self.scrape(client)
                while self.available and not stop.is_set():
                    try:
                        await asyncio.wait_for(stop.wait(), self.interval)
                    except TimeoutError:
                        pass
                    self.last = await self.scrape(client)
            except httpx.HTTPError:
                self.available = False

    def delta(self, name: str | None) -> float | None:
        if name is None or name not in self.last:
            return None
        return self.last[name] - self.first.get(name, 0.0)

    def summary(self) -> dict[str, float | None]:
        m = self.last
        used = pick(m, "block", "used") or pick(m, "block", "in_use")
        total = pick(m, "block", "total", exclude=("_created", "used", "in_use"))
        return {
            "kv_blocks_used_peak": self.peak.get(used) if used else None,
            "kv_blocks_total": m.get(total) if total else None,
            "kv_cache_usage_peak": self.peak.get("autoglm_kv_cache_usage_ratio"),
            "running_peak": self.peak.get("autoglm_requests_running"),
            "waiting_peak": self.peak.get("autoglm_requests_waiting"),
            "prefix_queries": self.delta("autoglm_prefix_cache_queries_total"),
            "prefix_hits": self.delta("autoglm_prefix_cache_hits_total"),
            "preemptions": self.delta(pick(m, "preempt", "_total")),
        }


# ------------------------------------------------------------------ driver


@dataclass
class Record:
    agent: int
    step: int
    ttft: float | None
    e2e: float
    completion_tokens: int
    prompt_tokens: int | None  # the server's usage
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, when reported
    expected_prompt_tokens: int  # counted here
    shared_with_previous: int  # tokens this step's prompt shares with the previous step's (0 at step 1)
    error: str | None = None
    pod: str | None = None  # who answered, when known (see drive)


async def drive(base: str | list[str], model: str, system: str, agents: list[list[Step]], counter: PromptCounter,
                extra_body, think: bool = True, answer_cap: int | None = None,
                rng: random.Random | None = None) -> tuple[float, list[Record]]:
    """Run the agents against ``base``: one server, or several, one per request, picked by ``rng`` (as
    kube-proxy's iptables mode picks per connection) or, without it, in turn. Each record names the pod that
    answered: the router's ``x-autoglm-pod`` header, else the base URL when there are several.
    ``answer_cap``: generate at most that many tokens per step (the history still carries the whole answer,
    as the agent re-adds its own text)."""
    import openai

    bases = [base] if isinstance(base, str) else list(base)
    clients = [openai.AsyncOpenAI(base_url=b + "/v1", api_key="none", max_retries=0, timeout=900) for b in bases]
    turn = itertools.count()
    records: list[Record] = []

    async def agent(seq: list[Step]) -> None:
        prev: list[int] = []
        for k, st in enumerate(seq, start=1):
            msgs = messages_of(system, seq, k)
            ids = counter.ids(msgs)
            shared = _common_prefix(prev, ids) if prev else 0
            prev = ids
            new_tokens = min(counter.answer_tokens(st.answer), answer_cap or sys.maxsize)
            t0 = time.perf_counter()
            ttft, usage, err, n = None, None, None, 0
            i = rng.randrange(len(clients)) if rng else next(turn) % len(clients)
            pod = bases[i] if len(bases) > 1 else None
            try:
                raw = await clients[i].chat.completions.with_raw_response.create(
                    model=model, messages=msgs, stream=True, max_tokens=new_tokens, temperature=0.0, top_p=0.85,
                    frequency_penalty=0.2, stream_options={"include_usage": True}, extra_body=extra_body(new_tokens))
                pod = raw.headers.get("x-autoglm-pod") or pod
                stream = raw.parse()
                async for chunk in stream:
                    usage = chunk.usage or usage
                    for c in chunk.choices:
                        if c.delta.content:
                            n += 1
                            if ttft is None:
                                ttft = time.perf_counter() - t0
            except openai.APIError as exc:
                err = f"{type(exc).__name__}: {str(exc)[:200]}"
            details = getattr(usage, "prompt_tokens_details", None) if usage else None
            cached = getattr(details, "cached_tokens", None) if details is not None else None
            records.append(Record(st.agent, k, ttft, time.perf_counter() - t0,
                                  usage.completion_tokens if usage else n, usage.prompt_tokens if usage else None,
                                  cached, len(ids), shared, err, pod))
            if err:
                return
            if think and k < len(seq):
                await asyncio.sleep(st.think_s)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(agent(seq) for seq in agents))
    finally:
        for client in clients:
            await client.close()
    return time.perf_counter() - t0, records


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ------------------------------------------------------------------ systems


@dataclass
class SystemResult:
    system: str
    available: bool
    why: str = ""
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    failures: int = 0
    metrics: dict = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def by_step(self) -> dict[int, list[Record]]:
        out: dict[int, list[Record]] = {}
        for r in self.records:
            if r.error is None:
                out.setdefault(r.step, []).append(r)
        return dict(sorted(out.items()))

    def ttft_p50_from(self, first_step: int) -> float | None:
        return _pct([r.ttft for r in self.records if r.error is None and r.ttft is not None and r.step >= first_step],
                    0.5)


def start(argv: list[str], port: int, log: Path, ready_path: str, env: dict | None = None) -> ServerProcess | str:
    """A started server, or why it did not start (the last lines of its log)."""
    srv = ServerProcess(argv, port, log, env)
    try:
        srv.wait_ready(ready_path, timeout=300)
    except RuntimeError as exc:
        srv.stop()
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        code = srv.proc.returncode
        return f"{'exited with ' + str(code) if code is not None else str(exc)}: {(lines or ['(no log)'])[-1][:240]}"
    return srv


def ours_argv(args, model_dir: Path, extra: list[str]) -> list[str]:
    return [*shlex.split(args.ours_cmd), "--model", str(model_dir), "--host", "127.0.0.1", "--port", "{port}",
            "--served-model-name", "small-vl-agent", "--max-batch-size", str(max(args.agents, 1)),
            "--max-model-len", str(args.max_model_len), "--max-batch-tokens", str(args.max_batch_tokens),
            "--dtype", "float32", "--device", args.device, "--log-level", "warning",
            *shlex.split(args.ours_flags), *extra]


def run_system(name: str, argv: list[str], ready_path: str, model: str, extra_body, args, counter, system,
               agents, warm, env: dict | None = None, scrape: bool = True) -> SystemResult:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    log = args.logdir / (re.sub(r"\W+", "-", name).strip("-") + ".log")
    srv = start(argv, port, log, ready_path, env)
    if isinstance(srv, str):
        return SystemResult(name, False, why=srv)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(drive(base, model, warm[0], warm[1], counter, extra_body, think=False))

        async def measured():
            stop = asyncio.Event()
            sampler = Sampler(base)
            task = asyncio.create_task(sampler.run(stop)) if scrape else None
            try:
                return (*await drive(base, model, system, agents, counter, extra_body), sampler)
            finally:
                stop.set()
                if task:
                    await task

        wall, records, sampler = asyncio.run(measured())
    finally:
        srv.stop()
    tokens = sum(r.completion_tokens for r in records if r.error is None)
    return SystemResult(name, True, wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
                        failures=sum(r.error is not None for r in records),
                        metrics=sampler.summary() if scrape and sampler.available else {}, records=records)


# ------------------------------------------------------------------ report


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def step_table(results: list[SystemResult]) -> str:
    rows = ["| system | step | n | TTFT p50 s | TTFT p99 s | prompt tok | shared w/ prev | reused (cached) | "
            "computed | reused/shared |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        if not res.available:
            continue
        for k, rs in res.by_step().items():
            ttfts = [r.ttft for r in rs if r.ttft is not None]
            prompt = sum(r.prompt_tokens or r.expected_prompt_tokens for r in rs) / len(rs)
            shared = sum(r.shared_with_previous for r in rs) / len(rs)
            cached = [r.cached_tokens for r in rs if r.cached_tokens is not None]
            reused = sum(cached) / len(cached) if len(cached) == len(rs) else None
            computed = prompt - reused if reused is not None else None
            ratio = (reused / shared) if reused is not None and shared else None
            rows.append(f"| {res.system} | {k} | {len(rs)} | {_s(_pct(ttfts, 0.5))} | {_s(_pct(ttfts, 0.99))} | "
                        f"{prompt:.0f} | {shared:.0f} | {_n(reused)} | {_n(computed)} | "
                        f"{'-' if ratio is None else f'{ratio:.1%}'} |")
    return "\n".join(rows)


def system_table(results: list[SystemResult]) -> str:
    rows = ["| system | wall s | tokens/s | failures | peak KV blocks used / total | peak KV usage | "
            "prefix-cache hits / queries (tokens) | preemptions |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.available:
            rows.append(f"| {r.system} | unavailable: {r.why} |  |  |  |  |  |  |")
            continue
        m = r.metrics
        blocks = f"{_n(m.get('kv_blocks_used_peak'))} / {_n(m.get('kv_blocks_total'))}" if m else "-"
        usage = m.get("kv_cache_usage_peak")
        rows.append(f"| {r.system} | {r.wall_s:.1f} | {r.tokens_per_s:.1f} | {r.failures} | {blocks} | "
                    f"{'-' if usage is None else f'{usage:.0%}'} | {_n(m.get('prefix_hits'))} / "
                    f"{_n(m.get('prefix_queries'))} | {_n(m.get('preemptions'))} |")
    return "\n".join(rows)


def targets(results: dict[str, SystemResult]) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows; n/a when a system or a figure is missing."""
    on = results.get("on")
    rows = []
    if on and on.available:
        pairs = [(r.cached_tokens, r.shared_with_previous) for r in on.records
                 if r.error is None and r.step >= 2 and r.shared_with_previous]
        if pairs and all(c is not None for c, _ in pairs):
            worst = min(c / s for c, s in pairs)
            total = sum(c for c, _ in pairs) / sum(s for _, s in pairs)
            rows.append(("shared tokens reused from step 2 (all steps / worst step)", f"{total:.1%} / {worst:.1%}",
                         ">= 95%", "PASS" if worst >= 0.95 else "FAIL"))
        else:
            rows.append(("shared tokens reused from step 2", "not reported (no cached_tokens in usage)", ">= 95%",
                         "n/a"))
    else:
        rows.append(("shared tokens reused from step 2", "caching-on run unavailable", ">= 95%", "n/a"))
    ours = on.ttft_p50_from(3) if on and on.available else None
    no_cache = bool(on and on.available and on.why)  # the runtime has no prefix caching: a ratio, no verdict
    for key, label, goal in (("off", "prefix caching off", 0.6), ("hf", "transformers serve", 0.5)):
        other = results.get(key)
        theirs = other.ttft_p50_from(3) if other and other.available else None
        if ours is None or theirs is None:
            why = "no steps >= 3" if (on and on.available and ours is None) else f"{label} unavailable"
            rows.append((f"TTFT p50 steps >= 3: on / {label}", why, f"<= {goal}x", "n/a"))
        else:
            ratio = ours / theirs
            verdict = "n/a (no prefix caching)" if no_cache else ("PASS" if ratio <= goal else "FAIL")
            rows.append((f"TTFT p50 steps >= 3: on / {label}", f"{ours:.3f}s / {theirs:.3f}s = {ratio:.2f}x",
                         f"<= {goal}x", verdict))
    return rows


def plot(results: list[SystemResult], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for res in results:
        if not res.available or not res.records:
            continue
        steps = res.by_step()
        xs = list(steps)
        p50 = [_pct([r.ttft for r in steps[k] if r.ttft is not None], 0.5) for k in xs]
        p99 = [_pct([r.ttft for r in steps[k] if r.ttft is not None], 0.99) for k in xs]
        (line,) = ax.plot(xs, p50, marker="o", label=f"{res.system} p50")
        ax.plot(xs, p99, ls="--", color=line.get_color(), alpha=0.6, label=f"{res.system} p99")
    ax.set_xlabel("agent step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("TTFT (s)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------ modes


def compare(args, model_dir: Path, counter: PromptCounter) -> int:
    rev = git_rev()  # the runtime measured: the checkout as it was when the run started
    think = tuple(float(x) for x in args.think_time.split(":"))
    system, agents = plan(args.agents, args.steps, args.seed, (think[0], think[-1]), args.system_chars)
    warm = plan(1, 1, args.seed + 7, (0.0, 0.0), 200)  # code paths only: a short prompt
    print(f"workload: {args.agents} agents x {args.steps} steps, think {args.think_time}s; system prompt "
          f"{len(system)} chars ({sum(map(_is_cjk, system))} CJK) = {len(counter.tok(system)['input_ids'])} tokens; "
          f"one 1080x2400 screenshot = {counter.image_tokens} image tokens (image processor size.longest_edge = "
          f"{counter.longest_edge} px = {args.image_tokens} x 28x28x2); model {model_dir}", flush=True)
    ours_body = lambda n: {"ignore_eos": True}  # noqa: E731
    hf_body = lambda n: {"generation_config": json.dumps(  # noqa: E731
        {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n})}
    systems = {
        "on": ("autoglm, prefix caching on (default)", ours_argv(args, model_dir, []), "/ready", "small-vl-agent",
               ours_body, None),
        "off": ("autoglm, --no-prefix-caching", ours_argv(args, model_dir, ["--no-prefix-caching"]), "/ready",
                "small-vl-agent", ours_body, None),
        "hf": ("transformers serve --continuous-batching",
               [str(VENV_BIN / "transformers"), "serve", str(model_dir), "--continuous-batching", "--device",
                args.device, "--host", "127.0.0.1", "--port", "{port}", "--dtype", "float32",
                "--attn-implementation", "sdpa", "--cb-num-blocks", str(args.cb_num_blocks), "--cb-max-batch-tokens",
                str(args.max_batch_tokens)],
               "/health", str(model_dir), hf_body, {**os.environ, "HF_HUB_OFFLINE": "1"}),
    }
    results: dict[str, SystemResult] = {}
    for key in [s for s in ("on", "off", "hf") if s not in args.skip.split(",")]:
        name, argv, ready, model, body, env = systems[key]
        print(f"running {name} ...", flush=True)
        res = run_system(name, argv, ready, model, body, args, counter, system, agents, warm, env,
                         scrape=key != "hf")
        if res.available and key == "on" and not res.metrics.get("prefix_queries") and all(
                r.cached_tokens is None for r in res.records):
            res.system = "autoglm, default (no prefix caching in this runtime)"
            res.why = "this runtime reports no prefix caching (no cached_tokens, no autoglm_prefix_cache_* metrics)"
        results[key] = res
        print(f"  {'ok' if res.available else 'unavailable'}: {res.why or f'{res.wall_s:.1f}s'}", flush=True)

    ordered = list(results.values())
    print()
    print(system_table(ordered))
    print()
    print(step_table(ordered))
    print()
    print("| target | measured | goal | verdict |\n|---|---|---|---|")
    for row in targets(results):
        print("| " + " | ".join(row) + " |")
    for r in ordered:
        if r.available and r.why:
            print(f"- {r.system}: {r.why}")
    title = (f"Phone-agent loop: {args.agents} agents x {args.steps} steps, small-vl, {counter.image_tokens} "
             f"image tokens/screenshot, {args.device}, runtime {rev}")
    if any(r.available for r in ordered):
        plot(ordered, args.png, title)
        print(f"plot: {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "image_tokens": counter.image_tokens,
                                         "results": {k: asdict(v) for k, v in results.items()},
                                         "targets": targets(results)}, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r.failures == 0 for r in ordered if r.available) else 1


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int) -> int:
    """K and V of one position in every layer (the text model's config)."""
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * dtype_bytes


def capacity(args, model_dir: Path, counter: PromptCounter) -> int:
    """The most sequences each server keeps running at once on the same workload (no think time)."""
    if not args.server:
        print("--capacity needs at least one --server LABEL=ARGV", file=sys.stderr)
        return 2
    system, agents = plan(args.capacity_agents, args.steps, args.seed, (0.0, 0.0), args.system_chars)
    warm = plan(1, 1, args.seed + 7, (0.0, 0.0), 200)  # code paths only: a short prompt
    per_token = kv_bytes_per_token(model_dir, args.dtype_bytes)
    slots = args.kv_memory // (per_token * args.max_model_len)
    fields = {"kv_memory": str(args.kv_memory), "slots": str(max(slots, 1))}
    print(f"capacity: {args.capacity_agents} agents x {args.steps} steps at once, no think time; KV memory "
          f"{args.kv_memory} B = {args.kv_memory // per_token} token positions ({per_token} B each); a slot cache "
          f"holds {{slots}} = {slots} sequences of {args.max_model_len} positions", flush=True)
    rows = ["| server | running peak | waiting peak | KV blocks used peak / total | KV usage peak | preemptions | "
            "TTFT p50 s | TTFT p99 s | tokens/s | failures |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in args.server:
        label, _, cmd = spec.partition("=")
        argv = [*shlex.split(cmd.format(**fields)), "--model", str(model_dir), "--host", "127.0.0.1", "--port",
                "{port}", "--served-model-name", "small-vl-agent", "--dtype", "float32", "--device", args.device,
                "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
        print(f"running {label}: {shlex.join(argv)}", flush=True)
        res = run_system(label, argv, "/ready", "small-vl-agent", lambda n: {"ignore_eos": True}, args, counter,
                         system, agents, warm)
        if not res.available:
            rows.append(f"| {label} | unavailable: {res.why} |  |  |  |  |  |  |  |  |")
            continue
        m = res.metrics
        ttfts = [r.ttft for r in res.records if r.ttft is not None]
        usage = m.get("kv_cache_usage_peak")
        rows.append(f"| {label} | {_n(m.get('running_peak'))} | {_n(m.get('waiting_peak'))} | "
                    f"{_n(m.get('kv_blocks_used_peak'))} / {_n(m.get('kv_blocks_total'))} | "
                    f"{'-' if usage is None else f'{usage:.0%}'} | {_n(m.get('preemptions'))} | "
                    f"{_s(_pct(ttfts, 0.5))} | {_s(_pct(ttfts, 0.99))} | {res.tokens_per_s:.1f} | {res.failures} |")
    print()
    print("\n".join(rows))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--think-time", default="0.5:1.5", metavar="MIN:MAX", help="seconds between steps (uniform)")
    p.add_argument("--image-tokens", type=int, default=1200, help="merged image tokens per 1080x2400 screenshot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=16384, help="the agent model's context (and our runtime's)")
    p.add_argument("--system-chars", type=int, default=3400,
                   help="system prompt length in characters (~59%% CJK); 1100 gives the real prompt's token count "
                        "(~2,000) with this byte-level test tokenizer")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="per-step token budget, both servers")
    p.add_argument("--cb-num-blocks", type=int, default=1024, help="transformers serve's KV blocks")
    p.add_argument("--ours-cmd", default=str(VENV_BIN / "autoglm-runtime") + " serve",
                   help="the runtime's command (e.g. another checkout's .venv/bin/autoglm-runtime serve)")
    p.add_argument("--ours-flags", default="", help="extra flags for our runtime, e.g. '--kv-cache-memory 2e8'")
    p.add_argument("--skip", default="", help="comma list of systems to skip: on,off,hf")
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "models" / "small-vl")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "bench" / "agent-ttft.png")
    p.add_argument("--json", type=Path)
    p.add_argument("--capacity", action="store_true", help="capacity mode (see --server)")
    p.add_argument("--capacity-agents", type=int, default=32)
    p.add_argument("--kv-memory", type=int, default=256 << 20,
                   help="capacity mode: the KV memory both servers get; {kv_memory} and {slots} (the slot cache's "
                        "--max-batch-size at that memory and --max-model-len) are filled into each --server")
    p.add_argument("--dtype-bytes", type=int, default=4, help="bytes per KV element (fp32: 4)")
    p.add_argument("--server", action="append", default=[], metavar="LABEL=ARGV",
                   help="capacity mode: a runtime command line without --model/--port (repeat to compare)")
    args = p.parse_args()
    args.logdir = REPO / ".tmp" / "bench-agent"
    args.logdir.mkdir(parents=True, exist_ok=True)
    model_dir = agent_model(ensure_model(args.model_dir), args.image_tokens, args.max_model_len)
    counter = PromptCounter(model_dir)
    return capacity(args, model_dir, counter) if args.capacity else compare(args, model_dir, counter)


if __name__ == "__main__":
    sys.exit(main())
