"""response_format enforced with llguidance: json_schema output of a random-weight model parses and
validates, json_object gives a JSON object, guided and free requests share batches, through the
engine and through a real server with the real OpenAI client."""

from __future__ import annotations

import asyncio
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.guided import compile_response_format  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402
from tests.runtime.test_server import start_server  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]

SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"enum": ["Tap", "Swipe", "Type", "Back"]},
        "x": {"type": "integer", "minimum": 0, "maximum": 999},
        "done": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
    },
    "required": ["action", "x", "done", "note"],
    "additionalProperties": False,
}


def check_schema(obj):
    assert set(obj) == {"action", "x", "done", "note"}
    assert obj["action"] in ("Tap", "Swipe", "Type", "Back")
    assert isinstance(obj["x"], int) and not isinstance(obj["x"], bool) and 0 <= obj["x"] <= 999
    assert isinstance(obj["done"], bool) and isinstance(obj["note"], str) and len(obj["note"]) <= 6


async def _collect(eng, rid, prompt, params):
    text, last = "", None
    async for out in eng.generate(rid, prompt, params):
        text += out.new_text
        last = out
    return text, last


async def test_engine_json_schema_and_object_in_a_shared_batch(tiny_model_dir):
    eng = Engine(
        load_model(tiny_model_dir, dtype="float32", device="cpu"),
        max_batch_size=4,
        max_queue=16,
        max_batch_tokens=32,
        max_model_len=512,
    )
    await eng.start()
    schema_g = compile_response_format({"type": "json_schema", "json_schema": {"name": "step", "schema": SCHEMA}})
    object_g = compile_response_format({"type": "json_object"})
    prompts = [[11, 12, 13, 14], list(range(40, 80)), [7, 8], [300, 301, 302]]
    params = [
        SamplingParams(max_tokens=120, temperature=0.0, grammar=schema_g),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),  # free text next to them
        SamplingParams(max_tokens=120, temperature=1.0, seed=5, grammar=schema_g),
        SamplingParams(max_tokens=200, temperature=0.0, grammar=object_g),
    ]
    try:
        results = await asyncio.gather(
            *(_collect(eng, str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True)))
        )
    finally:
        await eng.stop()
    for i in (0, 2):
        text, last = results[i]
        assert last.finish_reason == "stop", text
        check_schema(json.loads(text))
    text, last = results[3]
    if last.finish_reason == "stop":  # an unconstrained object may be long; when it ends it parses
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")
    assert results[1][1].completion_tokens == 40  # the free request is untouched
    # Without the grammar the same greedy request is not JSON: the grammar did the work.
    eng2 = Engine(load_model(tiny_model_dir, dtype="float32", device="cpu"), max_batch_size=1, max_model_len=512)
    await eng2.start()
    try:
        free, _ = await _collect(eng2, "f", prompts[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    finally:
        await eng2.stop()
    with pytest.raises(ValueError):
        json.loads(free)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("guided-logs"), name="guided")
    yield srv
    srv.stop()


def test_server_json_schema_with_openai_client(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "step", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "next action?"}],
        max_tokens=150,
        temperature=0.0,
        response_format=fmt,
    )
    assert out.choices[0].finish_reason == "stop"
    check_schema(json.loads(out.choices[0].message.content))
    text = ""
    for chunk in client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=150,
        temperature=0.7,
        seed=1,
        response_format=fmt,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    check_schema(json.loads(text))
