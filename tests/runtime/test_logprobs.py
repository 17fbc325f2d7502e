"""logprobs / top_logprobs: equal to the model's own log-softmax at every generated position, in
the engine (batched, with penalties, which must not change the reported distribution) and through
a real server process with the real OpenAI client (chat streamed and not, completions)."""

from __future__ import annotations

import asyncio
import math

import pytest

torch = pytest.importorskip("torch")

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402
from tests.runtime.test_server import start_server  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


def model_logprobs(reference, prompt: list[int], out: list[int]) -> torch.Tensor:
    """[len(out), V] log-softmax of the model's next-token logits at each generated position."""
    ids = torch.tensor([prompt + out])
    with torch.inference_mode():
        logits = reference.model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(out) - 1]
    return logits.float().log_softmax(-1)


def check(reference, prompt, out_ids, items, k):
    ref = model_logprobs(reference, prompt, out_ids)
    assert len(items) == len(out_ids)
    for i, (tid, item) in enumerate(zip(out_ids, items, strict=True)):
        assert item.token_id == tid
        assert math.isclose(item.logprob, ref[i, tid].item(), abs_tol=1e-4)
        top = ref[i].topk(k)
        assert [t for t, _ in item.top] == top.indices.tolist()
        assert all(math.isclose(v, w, abs_tol=1e-4) for (_, v), w in zip(item.top, top.values.tolist(), strict=True))


async def test_engine_logprobs_match_log_softmax(reference):
    loaded = load_model(reference.model_dir, dtype="float32", device="cpu")
    eng = Engine(loaded, max_batch_size=3, max_queue=16, max_batch_tokens=20, max_model_len=256)
    await eng.start()
    prompts = [[5, 17, 99, 240, 8] * 6, [33, 44], list(range(50, 90)), [7] * 12]
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),  # none asked: none given
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=0, frequency_penalty=1.5),
        SamplingParams(max_tokens=7, temperature=0.9, seed=3, ignore_eos=True, logprobs=5),
    ]

    async def run(i):
        ids, items, n_outputs = [], [], 0
        async for out in eng.generate(str(i), prompts[i], params[i]):
            ids += out.new_token_ids
            n_outputs += 1
            if out.logprobs is not None:
                items += out.logprobs
            else:
                assert params[i].logprobs is None
        return ids, items

    try:
        results = await asyncio.gather(*(run(i) for i in range(4)))
    finally:
        await eng.stop()
    for i, (ids, items) in enumerate(results):
        if params[i].logprobs is None:
            assert items == []
            continue
        check(reference, prompts[i], ids, items, params[i].logprobs)
    # Greedy without penalties: the sampled token is the most likely one.
    assert all(it.top[0][0] == it.token_id for it in results[0][1])


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("lp-logs"), name="lp")
    yield srv
    srv.stop()


def test_server_logprobs_openai_client(server, reference):
    client = server.client()
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    full = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_token_ids": True},
    )
    ch = full.choices[0]
    prompt, out = ch.model_extra["prompt_token_ids"], ch.model_extra["token_ids"]
    ref = model_logprobs(reference, prompt, out)
    content = ch.logprobs.content
    assert len(content) == len(out)
    for i, (tid, c) in enumerate(zip(out, content, strict=True)):
        assert math.isclose(c.logprob, ref[i, tid].item(), abs_tol=1e-4)
        assert c.token == reference.tokenizer.decode([tid]) and len(c.top_logprobs) == 2
        assert math.isclose(c.top_logprobs[0].logprob, ref[i].max().item(), abs_tol=1e-4)
    streamed = []
    for chunk in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += [c.logprob for c in chunk.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]

    comp = client.completions.create(
        model="tiny",
        prompt="the quick brown fox",
        max_tokens=5,
        temperature=0.0,
        logprobs=3,
        extra_body={"return_token_ids": True},
    )
    c = comp.choices[0]
    ref = model_logprobs(reference, c.model_extra["prompt_token_ids"], c.model_extra["token_ids"])
    assert [round(v, 4) for v in c.logprobs.token_logprobs] == [
        round(ref[i, t].item(), 4) for i, t in enumerate(c.model_extra["token_ids"])
    ]
    assert all(len(t) <= 3 for t in c.logprobs.top_logprobs) and c.logprobs.text_offset[0] == 0
    # No logprobs asked: none sent.
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0.0)
    assert plain.choices[0].logprobs is None
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": msgs, "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


def test_chat_logprob_bytes_are_the_raw_token_bytes(reference):
    """A byte-level token holding the first byte of a multi-byte character decodes to U+FFFD; the
    `bytes` field carries the real byte."""
    from autoglm_runtime.logprobs import TokenLogprob, chat_logprobs
    from autoglm_runtime.sampling import byte_level_token_bytes

    tok = reference.tokenizer
    table = byte_level_token_bytes(tok)
    assert table is not None
    tid = table.index(b"\xe4")  # the lone lead byte of a 3-byte UTF-8 character
    out = chat_logprobs([TokenLogprob(tid, -0.5, [(tid, -0.5)])], lambda ids: tok.decode(ids), table)["content"][0]
    assert out["token"] == "\ufffd" and out["bytes"] == [0xE4] and out["top_logprobs"][0]["bytes"] == [0xE4]
