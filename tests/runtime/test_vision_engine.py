"""Vision-language engine tests on a tiny random-weight Glm4vForConditionalGeneration: greedy
output with images equals `generate` on the same inputs, alone and under continuous batching with
text-only and other image requests joining and leaving, chunked prefill splitting images, and the
encoder cache."""

from __future__ import annotations

import asyncio
import io
import random

import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.multimodal import content_hash  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402
from autoglm_runtime.vision import VisionLanguage  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]


def make_image(w: int, h: int, seed: int):
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + w // 3), min(h, y + h // 3)))
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded(tiny_vl_model_dir):
    return load_model(tiny_vl_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_vl_model_dir):
    return load_model(tiny_vl_model_dir, dtype="float32", device="cpu")


def chat_text(tok, n_images: int, text: str, history: bool = False) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    msgs = [{"role": "system", "content": "You are a phone agent."}]
    if history:
        msgs += [
            {"role": "user", "content": "open the settings app"},
            {"role": "assistant", "content": "do(action=Launch)"},
        ]
    msgs.append({"role": "user", "content": content})
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def make_request(vl: VisionLanguage, tok, images, text: str, history=False):
    datas = [png_bytes(im) for im in images]
    return vl.process(chat_text(tok, len(images), text, history), images, [content_hash(d) for d in datas])


def reference_generate(reference, ids, mm, n):
    kwargs = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids_t = torch.tensor([ids])
    if mm is None:
        out = reference.model.generate(ids_t, attention_mask=torch.ones_like(ids_t), **kwargs)
    else:
        out = reference.model.generate(
            ids_t,
            attention_mask=torch.ones_like(ids_t),
            pixel_values=mm.pixel_values,
            image_grid_thw=mm.image_grid_thw,
            mm_token_type_ids=(ids_t == reference.model.config.image_token_id).long(),
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


async def collect(engine, rid, ids, mm, n):
    out_ids = []
    async for out in engine.generate(rid, ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), mm=mm):
        out_ids += out.new_token_ids
    return out_ids


async def test_image_request_alone_matches_generate(loaded, reference):
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=512, max_model_len=1024)
    await eng.start()
    tok = loaded.tokenizer
    try:
        ids, mm = make_request(eng.vision, tok, [make_image(200, 120, 1)], "What is on the screen?")
        _, mm_ref = make_request(
            VisionLanguage(reference.model, tok, reference.image_processor),
            tok,
            [make_image(200, 120, 1)],
            "What is on the screen?",
        )
        assert mm.num_images == 1 and sum(mm.tokens_per_image) > 4
        assert mm.rope_delta < 0  # image tokens share rows/columns: positions run behind the index
        got = await collect(eng, "a", ids, mm, 16)
    finally:
        await eng.stop()
    assert got == reference_generate(reference, ids, mm_ref, 16)


async def test_batched_images_and_text_with_chunked_prefill_match_generate(loaded, reference):
    """A 16-token budget splits every image's tokens across chunks; 3 slots for 7 requests (image,
    two-image, text-only, with history) make requests join and leave the batch mid-decode."""
    eng = Engine(loaded, max_batch_size=3, max_queue=32, max_batch_tokens=16, max_model_len=1024)
    await eng.start()
    tok = loaded.tokenizer
    ref_vl = VisionLanguage(reference.model, tok, reference.image_processor)
    specs = [  # (image sizes, text, history, new tokens)
        ([(200, 120)], "tap the button", False, 9),
        ([], "just text here", False, 14),
        ([(90, 160), (150, 150)], "compare both screens", True, 7),
        ([(300, 90)], "where is the search bar", True, 12),
        ([], "another plain question", True, 5),
        # same image as the first, after other history (so not from the prefix cache): encoder cache
        ([(200, 120)], "tap the button", True, 10),
        ([(64, 64)], "small", False, 11),
    ]
    reqs, refs = [], []
    for i, (sizes, text, hist, _) in enumerate(specs):
        seeds = [1 if s == (200, 120) else 10 + i * 3 + j for j, s in enumerate(sizes)]
        images = [make_image(w, h, sd) for (w, h), sd in zip(sizes, seeds, strict=True)]
        reqs.append(make_request(eng.vision, tok, images, text, hist))
        refs.append(make_request(ref_vl, tok, images, text, hist))
    try:
        results = await asyncio.gather(
            *(
                collect(eng, f"r{i}", ids, mm, n)
                for i, ((ids, mm), (_, _, _, n)) in enumerate(zip(reqs, specs, strict=True))
            )
        )
        hits = eng.vision.cache.hits
    finally:
        await eng.stop()
    for i, ((ids, _), (_, mm_ref), (_, _, _, n), got) in enumerate(zip(reqs, refs, specs, results, strict=True)):
        assert got == reference_generate(reference, ids, mm_ref, n), f"request {i} diverged from generate"
    assert hits >= 1, "the repeated image should come from the encoder cache"


async def test_repeated_image_skips_processor_and_encoder(loaded, reference):
    """An image seen before (same bytes) takes its embeddings and grid from the encoder cache at
    preprocessing: no pixels, no encoder run, and the same greedy output as generate."""
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=24, max_model_len=1024)
    await eng.start()
    tok = loaded.tokenizer
    img = make_image(210, 140, 42)
    try:
        ids1, mm1 = make_request(eng.vision, tok, [img], "first look")
        assert mm1.pixel_values.numel() > 0
        out1 = await collect(eng, "a", ids1, mm1, 8)
        ids2, mm2 = make_request(eng.vision, tok, [img, make_image(90, 90, 43)], "second look", history=True)
        assert mm2.patches_per_image[0] == 0 and mm2.patches_per_image[1] > 0  # only the new image has pixels
        calls = []
        visual = loaded.model.model.visual
        handle = visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        try:
            out2 = await collect(eng, "b", ids2, mm2, 8)
        finally:
            handle.remove()
    finally:
        await eng.stop()
    assert calls == [mm2.patches_per_image[1]], "the encoder should run on the new image only"
    ref_vl = VisionLanguage(reference.model, tok, reference.image_processor)
    _, ref1 = make_request(ref_vl, tok, [img], "first look")
    _, ref2 = make_request(ref_vl, tok, [img, make_image(90, 90, 43)], "second look", history=True)
    assert out1 == reference_generate(reference, ids1, ref1, 8)
    assert out2 == reference_generate(reference, ids2, ref2, 8)


def test_make_model_cli_writes_the_published_layout(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    cli = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "autoglm-runtime"
    out = tmp_path / "vl"
    subprocess.run([str(cli), "make-model", "--size", "tiny-vl", "--out", str(out)], check=True, capture_output=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4vForConditionalGeneration"] and cfg["model_type"] == "glm4v"
    assert cfg["text_config"]["rope_parameters"]["mrope_section"] and cfg["vision_config"]["spatial_merge_size"] == 2
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Glm4vImageProcessor" and pre["patch_size"] == 14
    assert list(out.glob("*.safetensors"))
    loaded = load_model(out, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    assert tok.convert_tokens_to_ids("<|image|>") == cfg["image_token_id"]
    text = chat_text(tok, 1, "hi")
    assert text.startswith("[gMASK]<sop>") and "<|begin_of_image|><|image|><|end_of_image|>" in text
