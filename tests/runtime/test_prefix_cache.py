"""Paged KV + prefix caching on real tiny models: greedy output (and logprobs) identical with the cache on
and off and equal to `generate`, in batches where cache hits, misses, evictions and preemptions happen in
the same steps; images hashed by content so two screenshots behind identical text never share KV."""

from __future__ import annotations

import asyncio
import random

import pytest

torch = pytest.importorskip("torch")

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.model_runner import kv_bytes_per_token_for, text_config  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]

BS = 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


def small_pool(loaded, tokens: int) -> int:
    return tokens * kv_bytes_per_token_for(text_config(loaded.config), loaded.dtype.itemsize)


async def run(eng, rid, prompt, n, logprobs=None, mm=None, salt=None):
    ids, lps, last = [], [], None
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    async for out in eng.generate(rid, prompt, params, mm=mm, cache_salt=salt):
        ids += out.new_token_ids
        lps += out.logprobs or []
        last = out
    return ids, lps, last


def agent_workload(seed: int = 0):
    """Waves of requests sharing a system prefix and each other's history (the agent's shape)."""
    rng = random.Random(seed)
    system = [rng.randint(10, 1000) for _ in range(37)]
    waves = []
    history: dict[int, list[int]] = {a: [] for a in range(4)}
    for _ in range(3):
        wave = []
        for agent in range(4):
            history[agent] += [rng.randint(10, 1000) for _ in range(rng.randint(3, 11))]
            wave.append((f"a{agent}", system + history[agent], rng.randint(4, 14)))
        waves.append(wave)
    return waves


async def serve_waves(loaded, waves, prefix_caching: bool, logprobs=None):
    # 120 usable tokens for 4 agents whose sequences grow to ~100 tokens: preemptions and evictions
    eng = Engine(
        loaded,
        max_batch_size=4,
        max_queue=64,
        max_batch_tokens=24,
        max_model_len=112,
        block_size=BS,
        kv_cache_memory=small_pool(loaded, 30 * BS),
        enable_prefix_caching=prefix_caching,
    )
    await eng.start()
    results = {}
    try:
        for w, wave in enumerate(waves):
            outs = await asyncio.gather(*(run(eng, f"{rid}-{w}", p, n, logprobs) for rid, p, n in wave))
            for (rid, p, n), out in zip(wave, outs, strict=True):
                results[(rid, w)] = (p, n, out)
        stats = eng.stats()
        evictions = eng._serving.scheduler.blocks.evictions
    finally:
        await eng.stop()
    return results, stats, evictions


async def test_greedy_identical_with_cache_on_and_off_under_hits_evictions_and_preemptions(loaded, reference):
    waves = agent_workload()
    on, on_stats, evictions = await serve_waves(loaded, waves, prefix_caching=True)
    off, off_stats, _ = await serve_waves(loaded, waves, prefix_caching=False)
    # the test is about all of these happening, in the same batches
    assert on_stats.prefix_cache_hits > 0 and on_stats.num_preemptions > 0 and evictions > 0
    assert off_stats.prefix_cache_hits == 0
    cached = 0
    for key, (p, n, (ids, _, last)) in on.items():
        assert ids == off[key][2][0], f"{key}: cache on and off differ"
        ref = reference.model.generate(
            torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert ids == ref, f"{key}: diverged from generate"
        assert last.num_cached_tokens % BS == 0 and last.num_cached_tokens < len(p)
        cached += last.num_cached_tokens
    assert cached > 0  # later waves reuse the shared system prompt and their own history


async def test_logprobs_identical_with_cache_on_and_off(loaded):
    waves = agent_workload(seed=3)[:2]
    on, stats, _ = await serve_waves(loaded, waves, prefix_caching=True, logprobs=3)
    off, _, _ = await serve_waves(loaded, waves, prefix_caching=False, logprobs=3)
    assert stats.prefix_cache_hits > 0
    for key, (_, _, (ids, lps, _)) in on.items():
        ids_off, lps_off, _ = off[key][2]
        assert ids == ids_off and len(lps) == len(lps_off) == len(ids)
        for a, b in zip(lps, lps_off, strict=True):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


async def test_prefix_evicted_between_two_steps_is_recomputed(loaded, reference):
    """A's prefix is cached, then other prompts take every free block: A again finds nothing and is exact."""
    eng = Engine(
        loaded,
        max_batch_size=2,
        max_queue=8,
        max_batch_tokens=64,
        max_model_len=64,
        block_size=BS,
        kv_cache_memory=small_pool(loaded, 20 * BS),
    )
    await eng.start()
    rng = random.Random(5)
    a = [rng.randint(10, 1000) for _ in range(41)]
    try:
        first = await run(eng, "a1", a, 6)
        again = await run(eng, "a2", a, 6)
        assert again[2].num_cached_tokens == 40  # every whole block but the last token's
        for i in range(2):  # 2 x 60 tokens through a 80-token pool: A's blocks are evicted
            await run(eng, f"x{i}", [rng.randint(10, 1000) for _ in range(55)], 5)
        third = await run(eng, "a3", a, 6)
        evictions = eng._serving.scheduler.blocks.evictions
    finally:
        await eng.stop()
    assert evictions > 0 and third[2].num_cached_tokens == 0
    ref = reference.model.generate(torch.tensor([a]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(a):].tolist()
    assert first[0] == again[0] == third[0] == ref


async def test_cache_salt_keeps_prefixes_apart(loaded):
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=64, max_model_len=64, block_size=BS)
    await eng.start()
    p = list(range(100, 141))
    try:
        await run(eng, "t1", p, 2, salt="tenant-1")
        other = await run(eng, "t2", p, 2, salt="tenant-2")
        same = await run(eng, "t3", p, 2, salt="tenant-1")
    finally:
        await eng.stop()
    assert other[2].num_cached_tokens == 0 and same[2].num_cached_tokens == 40
    assert other[0] == same[0]


async def test_two_screenshots_behind_identical_text_never_share_kv(tiny_vl_model_dir):
    from tests.runtime.test_vision_engine import make_image, make_request, reference_generate
    from autoglm_runtime.vision import VisionLanguage

    vl_loaded = load_model(tiny_vl_model_dir, dtype="float32", device="cpu")
    vl_ref = load_model(tiny_vl_model_dir, dtype="float32", device="cpu")
    tok = vl_loaded.tokenizer
    eng = Engine(vl_loaded, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=1024, block_size=BS)
    await eng.start()
    ref_vl = VisionLanguage(vl_ref.model, tok, vl_ref.image_processor)
    img_a, img_b = make_image(200, 120, 1), make_image(200, 120, 2)  # same size: same placeholder tokens
    text = "what should I tap next"
    ids_a, mm_a = make_request(eng.vision, tok, [img_a], text, history=True)
    ids_b, mm_b = make_request(eng.vision, tok, [img_b], text, history=True)
    ids_a2, mm_a2 = make_request(eng.vision, tok, [img_a], text, history=True)
    assert ids_a == ids_b  # identical token ids: only the image hashes tell them apart
    first_image_token = int(mm_a.image_token_pos[0])
    calls = []
    handle = vl_loaded.model.model.visual.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out_a = await run(eng, "a", ids_a, 8, mm=mm_a)
        out_b = await run(eng, "b", ids_b, 8, mm=mm_b)
        n_calls = len(calls)
        out_a2 = await run(eng, "a2", ids_a2, 8, mm=mm_a2)
    finally:
        handle.remove()
        await eng.stop()
    assert out_b[2].num_cached_tokens <= first_image_token  # only the text before the image is shared
    assert out_a2[2].num_cached_tokens >= int(mm_a.image_token_pos[-1]) + 1  # the whole image came from cache
    assert len(calls) == n_calls, "the vision encoder ran for an image whose KV was cached"
    _, ref_a = make_request(ref_vl, tok, [img_a], text, history=True)
    _, ref_b = make_request(ref_vl, tok, [img_b], text, history=True)
    want_a, want_b = reference_generate(vl_ref, ids_a, ref_a, 8), reference_generate(vl_ref, ids_b, ref_b, 8)
    assert want_a != want_b  # otherwise the test could not tell shared KV apart
    assert out_a[0] == out_a2[0] == want_a and out_b[0] == want_b


async def test_image_requests_preempted_and_recomputed_match_generate(tiny_vl_model_dir):
    """A pool that holds one image request and a bit: the newer ones are preempted mid-decode and recompute
    prompt + output (M-RoPE positions of the generated tokens included) from scratch or the prefix cache."""
    from tests.runtime.test_vision_engine import make_image, make_request, reference_generate
    from autoglm_runtime.vision import VisionLanguage

    vl_loaded = load_model(tiny_vl_model_dir, dtype="float32", device="cpu")
    vl_ref = load_model(tiny_vl_model_dir, dtype="float32", device="cpu")
    tok = vl_loaded.tokenizer
    specs = [((200, 120), 1, "tap the button"), ((120, 200), 2, "scroll down"), ((160, 160), 3, "go back")]
    n_new = 24
    probe = VisionLanguage(vl_ref.model, tok, vl_ref.image_processor)
    longest = max(len(make_request(probe, tok, [make_image(w, h, s)], t)[0]) for (w, h), s, t in specs)
    max_len = -(-(longest + n_new + 1) // BS) * BS
    eng = Engine(
        vl_loaded,
        max_batch_size=3,
        max_queue=8,
        max_batch_tokens=64,
        max_model_len=max_len,
        block_size=BS,
        kv_cache_memory=small_pool(vl_loaded, max_len + 4 * BS),
    )
    await eng.start()
    reqs = [make_request(eng.vision, tok, [make_image(w, h, s)], t) for (w, h), s, t in specs]
    try:
        outs = await asyncio.gather(*(run(eng, f"r{i}", ids, n_new, mm=mm) for i, (ids, mm) in enumerate(reqs)))
        preemptions = eng.stats().num_preemptions
    finally:
        await eng.stop()
    assert preemptions > 0
    for ((w, h), s, t), (ids, _), (got, _, _) in zip(specs, reqs, outs, strict=True):
        _, mm_ref = make_request(probe, tok, [make_image(w, h, s)], t)
        assert got == reference_generate(vl_ref, ids, mm_ref, n_new)
