"""The Open-AutoGLM phone agent's request against a REAL `autoglm-runtime serve` process serving a
tiny GLM-4.1V-shaped model, with the REAL OpenAI client: streaming, a screenshot as a PNG data
URI before the text, temperature 0 / top_p 0.85 / frequency_penalty 0.2 / max_tokens 3000; with an
earlier turn in the history; and bad images answered 400 (naming the limit) while the server keeps
serving."""

from __future__ import annotations

import base64
import io
import random

import httpx
import openai
import pytest

from tests.runtime.test_server import start_server

Image = pytest.importorskip("PIL.Image")

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]

SYSTEM = "You are a phone-operating agent. Output the thinking, then do(action=...) or finish(message=...)."


def screenshot(w: int = 270, h: int = 600, seed: int = 0, fmt: str = "PNG") -> str:
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (240, 240, 240))
    for _ in range(20):
        x, y = rng.randrange(w), rng.randrange(h)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(w, x + 60), min(h, y + 30)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def user_turn(text: str, image_b64: str | None, mime: str = "image/png") -> dict:
    content = []
    if image_b64 is not None:
        content.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{image_b64}"}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


AGENT_PARAMS = dict(max_tokens=3000, temperature=0.0, top_p=0.85, frequency_penalty=0.2)


@pytest.fixture(scope="module")
def server(tiny_vl_model_dir, tmp_path_factory):
    srv = start_server(tiny_vl_model_dir, tmp_path_factory.mktemp("vl-logs"), "--max-model-len", "3400", name="vl")
    yield srv
    srv.stop()


def stream_text(client: openai.OpenAI, messages: list[dict], **params) -> tuple[str, str | None]:
    text, finish = "", None
    stream = client.chat.completions.create(model="tiny", messages=messages, stream=True, **params)
    for chunk in stream:
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content is not None:
            text += chunk.choices[0].delta.content
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_phone_agent_request_shape_streams(server):
    client = server.client()
    messages = [
        {"role": "system", "content": SYSTEM},
        user_turn("Task: open Settings. Current app: Home", screenshot()),
    ]
    text, finish = stream_text(client, messages, **AGENT_PARAMS)
    assert finish in ("stop", "length") and text
    # The same request, not streamed, answers the same greedy text.
    full = client.chat.completions.create(model="tiny", messages=messages, **AGENT_PARAMS)
    assert full.choices[0].message.content == text
    assert full.usage.prompt_tokens > 40  # the image's tokens are in the prompt


def test_phone_agent_second_step_with_history(server):
    """Step 2 as the agent sends it: the old screenshot stripped from the history, a new one last."""
    client = server.client()
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "Task: open Settings. Current app: Home"}]},
        {"role": "assistant", "content": '<think>tap the icon</think><answer>do(action="Tap", element=[500,500])'},
        user_turn("** Screen Info ** Current app: Settings", screenshot(seed=1)),
    ]
    text, finish = stream_text(client, messages, **AGENT_PARAMS)
    assert finish in ("stop", "length") and text
    # A different screenshot is a different prompt: the image really reaches the model.
    other, _ = stream_text(
        client,
        messages[:-1] + [user_turn("** Screen Info ** Current app: Settings", screenshot(seed=7))],
        max_tokens=20,
        temperature=0.0,
    )
    first, _ = stream_text(client, messages, max_tokens=20, temperature=0.0)
    assert first != other


def test_jpeg_and_webp_are_served(server):
    client = server.client()
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        out = client.chat.completions.create(
            model="tiny", max_tokens=4, temperature=0.0, messages=[user_turn("describe", screenshot(fmt=fmt), mime)]
        )
        assert out.choices[0].finish_reason in ("stop", "length")


def _post(server, messages) -> httpx.Response:
    return server.post("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 4, "stream": True})


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_400_naming_the_limit_and_server_keeps_serving(server):
    good = base64.b64decode(screenshot())
    huge = _png_bytes(Image.new("1", (10_000, 5_000)))  # 50 megapixels (a few KB encoded)
    cases = [
        (user_turn("x", base64.b64encode(good[: len(good) // 2]).decode()), "cannot decode the image", "invalid_image"),
        (
            user_turn("x", base64.b64encode(b"this is not an image at all" * 10).decode()),
            "cannot decode",
            "invalid_image",
        ),
        (user_turn("x", base64.b64encode(huge).decode()), "--max-image-pixels", "image_too_large"),
        (user_turn("x", "!!!not-base64!!!"), "", "invalid_image"),
        (
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + screenshot(8, 8)}}]
                * 20
                + [{"type": "text", "text": "x"}],
            },
            "--max-images-per-request",
            "too_many_images",
        ),
        (
            user_turn("x", None)
            | {"content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            "--allowed-media-domains",
            "image_url_not_allowed",
        ),
        (
            user_turn("x", None) | {"content": [{"type": "input_audio", "input_audio": {}}]},
            "unsupported content part",
            None,
        ),
    ]
    for msg, needle, code in cases:
        r = _post(server, [msg])
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["code"] == code, err
    assert server.get("/health").status_code == 200
    out = server.client().chat.completions.create(
        model="tiny", max_tokens=3, temperature=0.0, messages=[user_turn("still there?", screenshot(seed=3))]
    )
    assert out.choices[0].finish_reason in ("stop", "length")


def test_response_format_bad_types_and_schemas_are_400(server):
    for fmt, needle in (
        ({"type": "xml"}, "not supported"),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}, "nonsense"),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, "json_schema.schema"),
    ):
        r = server.post(
            "/v1/chat/completions",
            {"model": "tiny", "max_tokens": 4, "response_format": fmt, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    ok = server.post(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "max_tokens": 2,
            "response_format": {"type": "text"},
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert ok.status_code == 200


def test_concurrent_image_and_text_requests_answer_as_alone(server):
    """Image requests (different screens, one repeated) and text requests batched by the server each
    answer exactly what they answer alone (greedy)."""
    import asyncio

    shots = [screenshot(seed=s) for s in (11, 12, 11)]
    reqs = [[{"role": "system", "content": SYSTEM}, user_turn(f"step {i}", shot)] for i, shot in enumerate(shots)]
    reqs += [
        [{"role": "user", "content": "plain text question number one"}],
        [{"role": "user", "content": [{"type": "text", "text": "another text-only turn"}]}],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": "Task: open Settings"}]},
            {"role": "assistant", "content": 'do(action="Back")'},
            user_turn("step after back", screenshot(seed=13, w=540, h=1200)),
        ],
    ]
    params = dict(max_tokens=12, temperature=0.0, top_p=0.85, frequency_penalty=0.2, extra_body={"ignore_eos": True})

    async def one(client, msgs):
        out = await client.chat.completions.create(model="tiny", messages=msgs, **params)
        return out.choices[0].message.content

    async def together():
        client = server.aclient()
        return await asyncio.gather(*(one(client, m) for m in reqs))

    batched = asyncio.run(together())
    client = server.client()
    alone = [
        client.chat.completions.create(model="tiny", messages=m, **params).choices[0].message.content for m in reqs
    ]
    assert batched == alone
    assert batched[0] != batched[1]  # different screens, different answers: the images are not mixed up


def test_penalties_reach_the_engine_through_the_api(server):
    """The same greedy request with and without penalties: the penalized answer repeats less."""
    client = server.client()
    msgs = [{"role": "user", "content": "the the the the the"}]
    base = dict(
        model="tiny",
        messages=msgs,
        max_tokens=40,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    plain = client.chat.completions.create(**base).choices[0].model_extra["token_ids"]
    freq = client.chat.completions.create(frequency_penalty=2.0, **base).choices[0].model_extra["token_ids"]
    rep = client.chat.completions.create(**{**base, "extra_body": {**base["extra_body"], "repetition_penalty": 3.0}})
    rep = rep.choices[0].model_extra["token_ids"]
    assert len(set(freq)) > len(set(plain)) and rep != plain
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": msgs, "frequency_penalty": 2.5})
    assert r.status_code == 400 and "frequency_penalty" in r.text


def test_encoder_cache_metrics(server):
    from tests.runtime.test_server import metric

    def scrape():
        text = server.metrics()
        return (metric(text, "autoglm_encoder_cache_hits_total"), metric(text, "autoglm_encoder_cache_misses_total"))

    client = server.client()
    msgs = [user_turn("same screen twice", screenshot(seed=99))]
    before = scrape()
    client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0.0)
    first = scrape()
    # the same image after other text: its KV is not in the prefix cache, its embeddings are in the encoder's
    other = [{"role": "system", "content": "another agent"}, *msgs]
    client.chat.completions.create(model="tiny", messages=other, max_tokens=2, temperature=0.0)
    second = scrape()
    # the first request again: the whole image comes from the prefix cache, the encoder is not asked at all
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0.0)
    third = scrape()
    assert [b - a for a, b in zip(before, first, strict=True)] == [0, 1]  # new image: a miss, the encoder runs
    assert [b - a for a, b in zip(first, second, strict=True)] == [1, 0]  # same bytes: a hit, no encoder run
    assert third == second and again.usage.prompt_tokens_details.cached_tokens > 0
