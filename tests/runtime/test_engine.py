"""Engine tests on a real (tiny, random-weight) GLM model: batching correctness against
`model.generate`, sampling, stop strings, abort, reload, health and loader errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")

from autoglm_runtime.engine import (  # noqa: E402
    Engine,
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    QueueFullError,
)
from autoglm_runtime.loader import ModelLoadError, load_model  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]

WORDS = "the quick brown fox jumps over a lazy dog while the server streams tokens to every client".split()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A separate copy of the model for `generate` (the engine's copy uses its own attention)."""
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture
async def engine(loaded):
    eng = Engine(loaded, max_batch_size=4, max_queue=64, max_batch_tokens=48, max_model_len=512, seed=0)
    await eng.start()
    yield eng
    await eng.stop()


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 9, 17, 33, 47, 70, 120, 5, 60, 25, 90][:n]
    out = []
    for length in lengths:
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        out.append(tokenizer.encode(text, add_special_tokens=False)[: max(1, length)])
    return out


async def until(predicate, timeout: float = 10.0, message: str = ""):
    """Async polling (the event loop keeps running while we wait)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {message or predicate!r}")
        await asyncio.sleep(0.01)


async def collect(engine, rid, prompt, params, priority=0):
    ids, text, last = [], "", None
    async for out in engine.generate(rid, prompt, params, priority):
        ids += out.new_token_ids
        text += out.new_text
        last = out
    return ids, text, last


async def test_greedy_matches_generate_under_batching(engine, reference):
    tok = reference.tokenizer
    ps = prompts(tok, 8)
    n_new = 12
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    # 8 concurrent requests, 4 slots and a 48-token budget: requests join and leave the batch,
    # long prompts are prefilled in chunks, slots get compacted.
    results = await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(ps)))
    for p, (ids, text, last) in zip(ps, results):
        ref = reference.model.generate(
            torch.tensor([p]), max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert ids == ref, f"prompt of {len(p)} tokens diverged"
        assert last.finished and last.finish_reason == "length"
        assert last.completion_tokens == n_new and last.prompt_tokens == len(p)
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert last.first_token_time >= last.first_scheduled_time >= last.arrival_time


async def test_greedy_matches_generate_with_chunking_and_compaction(loaded, reference):
    """Random prompt lengths and max_tokens with a 24-token budget: prompts are prefilled in
    chunks next to running decodes, requests leave at different steps and the survivors are
    compacted (including decode ranges with holes). Every output must still equal generate."""
    eng = Engine(loaded, max_batch_size=4, max_queue=64, max_batch_tokens=24, max_model_len=512)
    await eng.start()
    try:
        rng = random.Random(1)
        ps = [[rng.randint(10, 1000) for _ in range(rng.randint(1, 90))] for _ in range(16)]
        ns = [rng.randint(1, 20) for _ in ps]
        results = await asyncio.gather(
            *(collect(eng, str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for i, (p, n) in enumerate(zip(ps, ns)))
        )
    finally:
        await eng.stop()
    for p, n, (ids, _, _) in zip(ps, ns, results):
        ref = reference.model.generate(
            torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert ids == ref
    # The engine's model object still works with plain generate outside engine steps.
    p, n = ps[0], ns[0]
    own = loaded.model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert own[0, len(p) :].tolist() == results[0][0]


async def test_eos_stops_with_reason_stop(loaded, reference):
    # Find a prompt whose greedy continuation hits eos, by forcing it with stop_token_ids on the
    # first greedy token: generation stops right there with reason "stop".
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=64, max_model_len=256)
    await eng.start()
    try:
        p = prompts(reference.tokenizer, 1)[0]
        first, _, _ = await collect(eng, "a", p, SamplingParams(max_tokens=1, temperature=0))
        ids, _, last = await collect(eng, "b", p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=first))
        assert ids == first and last.finish_reason == "stop"
    finally:
        await eng.stop()


def _with_eos(loaded, eos: int):
    """`loaded` whose EOS id is `eos` (the same model): lets a test pick where the model emits EOS."""
    import dataclasses

    class Forced(type(loaded)):
        eos_token_ids = property(lambda self: [eos])

    return Forced(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)})


async def test_min_tokens_suppresses_eos_and_stop_token_ids(loaded, reference):
    p = prompts(reference.tokenizer, 1)[0]
    eng = Engine(loaded, max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=256)
    await eng.start()
    try:
        greedy, _, _ = await collect(eng, "g", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    finally:
        await eng.stop()
    first = greedy[0]
    # The greedy first token is made the EOS: without min_tokens the request stops right there.
    eng = Engine(_with_eos(loaded, first), max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=256)
    await eng.start()
    try:
        assert eng.eos_token_ids == [first]
        # Concurrent (batched) requests: the mask is per row, the plain request still stops at once.
        (plain, _, plain_last), (ids, _, last), (st_ids, _, st_last), (ign, _, _) = await asyncio.gather(
            collect(eng, "plain", p, SamplingParams(max_tokens=12, temperature=0)),
            collect(eng, "min", p, SamplingParams(max_tokens=12, temperature=0, min_tokens=6)),
            collect(eng, "stop-id", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                      stop_token_ids=[first], min_tokens=4)),
            collect(eng, "ignore", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, min_tokens=6)),
        )
        assert plain == [first] and plain_last.finish_reason == "stop"
        assert len(ids) >= 6 and first not in ids[:6]
        assert last.completion_tokens == len(ids)
        assert last.finish_reason == ("stop" if ids[-1] == first else "length")
        assert len(st_ids) >= 4 and first not in st_ids[:4]
        assert st_last.finish_reason == ("stop" if st_ids[-1] == first else "length")
        assert ign == greedy  # ignore_eos: EOS is no stop token, so min_tokens masks nothing
    finally:
        await eng.stop()


async def test_min_tokens_defers_stop_strings(engine, reference):
    p = prompts(reference.tokenizer, 3)[2]
    ids_full, full, _ = await collect(engine, "full", p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    stop = full[:2]
    assert len(stop) == 2
    _, text, last = await collect(engine, "s", p, SamplingParams(max_tokens=16, temperature=0, stop=[stop],
                                                                  ignore_eos=True))
    assert text == "" and last.finish_reason == "stop"
    # Stop strings are not matched in the first min_tokens tokens (here: all of them).
    ids, text, last = await collect(engine, "m", p, SamplingParams(max_tokens=16, temperature=0, stop=[stop],
                                                                    ignore_eos=True, min_tokens=16))
    assert (ids, text, last.finish_reason) == (ids_full, full, "length")


async def test_stop_string_is_cut_and_not_returned(engine, reference):
    p = prompts(reference.tokenizer, 3)[2]
    _, full, _ = await collect(engine, "full", p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert len(full) > 6
    stop = full[3:6]
    expected = full[: full.find(stop)]
    ids, text, last = await collect(engine, "s", p, SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True))
    assert text == expected
    assert stop not in text
    assert last.finish_reason == "stop"


async def test_seed_reproducible_and_temperature_samples(engine, reference):
    p = prompts(reference.tokenizer, 4)[3]
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    # Same seed -> same tokens, even with other requests in the batch.
    a, b, *_ = await asyncio.gather(
        collect(engine, "a", p, params),
        collect(engine, "b", p, params),
        collect(engine, "c", p, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)),
    )
    c, _, _ = await collect(engine, "d", p, params)
    assert a[0] == b[0] == c
    greedy, _, _ = await collect(engine, "g", p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    other, _, _ = await collect(engine, "e", p, SamplingParams(max_tokens=16, temperature=1.5, seed=99, ignore_eos=True))
    assert a[0] != greedy
    assert other != a[0]


async def test_abort_frees_slot_and_disconnect_aborts(engine, reference):
    p = prompts(reference.tokenizer, 2)[1]
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    agen = engine.generate("long", p, params)
    first = await agen.__anext__()
    assert not first.finished
    assert engine.stats().num_running == 1
    engine.abort("long")
    outs = [o async for o in agen]
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.stats().num_running == 0

    # A consumer that goes away (client disconnect) aborts its request and frees the slot.
    agen = engine.generate("gone", p, params)
    async with contextlib.aclosing(agen):
        await agen.__anext__()
        assert engine.stats().num_running == 1
    assert engine.stats().num_running == 0

    # Task cancellation (what a disconnect looks like to a streaming handler) does the same.
    task = asyncio.create_task(collect(engine, "cancelled", p, params))
    await until(lambda: engine.stats().num_running == 1, message="request running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().num_running == 0


async def test_queue_full_and_invalid_requests(loaded):
    eng = Engine(loaded, max_batch_size=1, max_queue=1, max_batch_tokens=16, max_model_len=64)
    await eng.start()
    try:
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        running = eng.generate("run", [5, 6, 7], params)
        await running.__anext__()  # holds the only slot
        waiting = eng.generate("wait", [5, 6], params)
        wait_task = asyncio.create_task(waiting.__anext__())
        await until(lambda: eng.stats().num_waiting == 1, message="one waiting")
        with pytest.raises(QueueFullError):
            await eng.generate("full", [5], params).__anext__()
        with pytest.raises(InvalidRequestError):
            await eng.generate("long", list(range(10, 80)), params).__anext__()
        with pytest.raises(InvalidRequestError):
            await eng.generate("empty", [], params).__anext__()
        with pytest.raises(InvalidRequestError):
            await eng.generate("oov", [5, 10**6], params).__anext__()
        eng.abort("wait")
        assert (await wait_task).finish_reason == "abort"
        await running.aclose()
    finally:
        await eng.stop()


async def test_priority_runs_first(loaded):
    eng = Engine(loaded, max_batch_size=1, max_queue=8, max_batch_tokens=16, max_model_len=128)
    await eng.start()
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        order: list[str] = []

        async def run(rid, prio):
            _, _, last = await collect(eng, rid, [5, 6, 7], params, prio)
            order.append(rid)
            return last

        blocker = asyncio.create_task(run("blocker", 0))
        await asyncio.sleep(0)
        low = asyncio.create_task(run("low", 5))
        await asyncio.sleep(0)
        high = asyncio.create_task(run("high", -1))
        await asyncio.gather(blocker, low, high)
        assert order.index("high") < order.index("low")
    finally:
        await eng.stop()


async def test_reload_swaps_without_failures(tiny_model_dir, tmp_path, loaded, reference):
    from autoglm_runtime.modelmaker import make_model

    other = make_model("tiny", tmp_path / "other", seed=1)
    eng = Engine(loaded, max_batch_size=4, max_queue=64, max_batch_tokens=64, max_model_len=256)
    await eng.start()
    try:
        p = prompts(reference.tokenizer, 3)[2]
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        before, _, _ = await collect(eng, "before", p, params)
        in_flight = [asyncio.create_task(collect(eng, f"old{i}", p, params)) for i in range(6)]
        await asyncio.sleep(0.01)
        await eng.reload(other, revision="v2")
        assert eng.revision == "v2" and eng.model_dir == other
        new = [asyncio.create_task(collect(eng, f"new{i}", p, params)) for i in range(4)]
        results = await asyncio.gather(*in_flight, *new)
        assert all(r[2].finish_reason == "length" and len(r[0]) == 20 for r in results)
        # Requests admitted before the swap finished on the old weights.
        assert all(r[0] == before for r in results[:6])
        after, _, _ = await collect(eng, "after", p, params)
        assert after != before
        assert all(r[0] == after for r in results[6:])
        await until(lambda: eng.stats().num_models == 1, message="old model released")
        with pytest.raises(ModelLoadError):
            await eng.reload(tmp_path / "missing")
        assert eng.revision == "v2"
    finally:
        await eng.stop()


async def test_health_false_when_loop_dies(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=128)
    await eng.start()
    assert eng.check_health()
    runner = eng._serving.runner

    def boom(step):
        raise RuntimeError("injected failure")

    runner.execute = boom
    with pytest.raises(EngineDeadError):
        await collect(eng, "x", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
    assert not eng.check_health()
    with pytest.raises(EngineDeadError):
        await eng.generate("y", [5], SamplingParams(max_tokens=1)).__anext__()
    await eng.stop()


async def test_drain_stops_admission(loaded):
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=128)
    await eng.start()
    try:
        agen = eng.generate("a", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert not (await agen.__anext__()).finished  # admitted and running
        drain = asyncio.create_task(eng.drain(timeout=30))
        outs = [o async for o in agen]
        assert outs[-1].finish_reason == "length"
        assert await drain
        with pytest.raises(EngineDrainingError):
            await eng.generate("b", [5], SamplingParams(max_tokens=1)).__anext__()
    finally:
        await eng.stop()


def test_loader_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(empty)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ModelLoadError):
        load_model(bad)
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(noweights)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")
    with pytest.raises(ModelLoadError, match="not supported on CPU"):
        load_model(tiny_model_dir, dtype="float16", device="cpu")
    lm = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.max_model_len == 1024 and lm.eos_token_ids == [2]


async def test_bfloat16_runs(tiny_model_dir):
    lm = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    eng = Engine(lm, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=128)
    await eng.start()
    try:
        ids, _, last = await collect(eng, "a", [5, 6, 7, 8], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert len(ids) == 5 and last.finish_reason == "length"
    finally:
        await eng.stop()


def test_sample_respects_per_row_params():
    from autoglm_runtime.sampling import SamplingState, sample

    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    dev = torch.device("cpu")
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=2.0, top_k=3, seed=7),
        SamplingParams(temperature=2.0, top_k=3, seed=7),
        SamplingParams(temperature=1.0),
    ]
    top3 = set(logits[3].topk(3).indices.tolist())
    seeded, unseeded = set(), set()
    for _ in range(20):
        out = sample(logits, [SamplingState(p, dev) for p in rows]).tolist()
        assert out[:3] == logits[:3].argmax(-1).tolist()  # greedy, top_k=1, tiny top_p
        assert out[3] in top3
        seeded.add((out[3], out[4]))
        unseeded.add(out[5])
    assert len(seeded) == 1  # a fresh generator with the same seed draws the same tokens
    assert len(unseeded) > 1
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError):
        SamplingParams(min_tokens=-1)


def test_sample_suppresses_per_row_until_min_tokens():
    from autoglm_runtime.sampling import SamplingState, min_tokens_suppression, sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top = logits.argmax(-1).tolist()
    dev = torch.device("cpu")
    rows = [
        SamplingParams(temperature=0, min_tokens=3),  # 1 token so far: EOS masked
        SamplingParams(temperature=0, min_tokens=3),  # 3 tokens so far: nothing masked
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[top[2], 999]),
        SamplingParams(temperature=0),
    ]
    states = [SamplingState(p, dev) for p in rows]
    eos = [frozenset({top[0]}), frozenset({top[1]}), frozenset({top[2] + 1}), frozenset({top[3]})]
    suppress = min_tokens_suppression(states, [1, 3, 0, 0], eos, 50, dev)
    assert suppress is not None
    assert sorted(zip(*(t.tolist() for t in suppress))) == [(0, top[0]), (2, top[2])]  # 999: not in the vocab
    out = sample(logits.clone(), states, suppress=suppress).tolist()
    assert out[0] != top[0] and out[2] != top[2]
    assert (out[1], out[3]) == (top[1], top[3])
    assert min_tokens_suppression(states, [3, 3, 3, 3], eos, 50, dev) is None


def test_incremental_detokenizer_holds_back_and_cuts_stop(reference):
    from autoglm_runtime.sampling import IncrementalDetokenizer

    tok = reference.tokenizer
    backend = tok.backend_tokenizer
    text = "Hello world, the server streams tokens. Ünïcödé 你好 END of story"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(backend, [])
    assert "".join(d.step(ids[: i + 1], final=i == len(ids) - 1) for i in range(len(ids))) == text
    d = IncrementalDetokenizer(backend, [" END"])
    pieces = []
    for i in range(len(ids)):
        pieces.append(d.step(ids[: i + 1], final=False))
        if d.stopped:
            break
    assert d.stopped and "".join(pieces) == text[: text.index(" END")]
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_adds_up_to_decode_for_any_ids(reference):
    """Random ids (lone UTF-8 continuation bytes, half characters, special tokens): the deltas add up to
    the tokenizer's own decode, and no delta carries half a character that a later token completes."""
    from autoglm_runtime.sampling import IncrementalDetokenizer

    backend = reference.tokenizer.backend_tokenizer
    vocab = backend.get_vocab_size(with_added_tokens=True)
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        d = IncrementalDetokenizer(backend, [])
        deltas = [d.step(ids[: i + 1], final=i == len(ids) - 1) for i in range(len(ids))]
        assert "".join(deltas) == backend.decode(ids, skip_special_tokens=True), ids


async def test_cancellation_storm_keeps_survivors_correct(loaded, reference):
    """Cancel half the requests at random moments (mid-prefill, mid-decode, while waiting): the
    slots are freed and the surviving requests, whose KV gets moved around, stay exact."""
    eng = Engine(loaded, max_batch_size=4, max_queue=64, max_batch_tokens=32, max_model_len=512)
    await eng.start()
    try:
        rng = random.Random(3)
        ps = [[rng.randint(10, 1000) for _ in range(rng.randint(1, 60))] for _ in range(12)]
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        tasks = [asyncio.create_task(collect(eng, str(i), p, params)) for i, p in enumerate(ps)]
        for i in range(0, 12, 2):
            await asyncio.sleep(rng.random() * 0.02)
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: eng.stats().num_running == 0 and eng.stats().num_waiting == 0, message="all slots free")
        for i in range(1, 12, 2):
            ref = reference.model.generate(
                torch.tensor([ps[i]]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(ps[i]) :].tolist()
            assert results[i][0] == ref
        assert eng.check_health()
    finally:
        await eng.stop()


async def test_event_loop_never_waits_on_a_step(loaded):
    """Admission, abort and stats are handed to the engine thread: while a step is stuck (here in
    `prepare`, which used to run under a lock the event loop also took), the loop carries on."""
    import threading

    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=128)
    inst = eng._serving
    entered, release = threading.Event(), threading.Event()
    real_prepare = inst.runner.prepare

    def stuck_prepare(*args, **kwargs):
        entered.set()
        release.wait()
        return real_prepare(*args, **kwargs)

    inst.runner.prepare = stuck_prepare
    await eng.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        first = asyncio.create_task(collect(eng, "first", [5, 6, 7], params))
        assert await asyncio.to_thread(entered.wait, 30)  # the engine thread is inside a step now
        # None of these may wait for the step (each would hang the loop, and this test, if it did):
        assert eng.stats().num_running == 1 and eng.check_health()
        second = asyncio.create_task(eng.add_request("second", [5, 6], params))
        eng.abort("first")
        await asyncio.sleep(0)
        assert not second.done()  # admission is applied between steps, and this one has not ended
        release.set()
        stream = await second
        outs = [o async for o in stream]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        _, _, last = await first
        assert last.finish_reason == "abort"
    finally:
        release.set()
        await eng.stop()


async def test_kv_cache_and_reload_respect_the_cgroup_memory_limit(tiny_model_dir, tmp_path, loaded, monkeypatch):
    from autoglm_runtime.loader import InsufficientMemoryError
    from autoglm_runtime.memory import CGROUP_ROOT_ENV, checkpoint_bytes
    from autoglm_runtime.model_runner import KVCacheTooLargeError, kv_bytes_per_token_for, text_config

    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "memory.current").write_text("0\n")
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(cg))
    per_token = kv_bytes_per_token_for(text_config(loaded.config), 4)
    kv = 4 * 256 * per_token
    weights = checkpoint_bytes(tiny_model_dir, 4, 4)
    assert kv > 0 and weights > 0
    # The host has GBs free; the container's limit is what counts.
    (cg / "memory.max").write_text(f"{kv // 2}\n")
    with pytest.raises(KVCacheTooLargeError, match="available"):
        Engine(loaded, max_batch_size=4, max_model_len=256, kv_cache_memory=kv)
    # By default the pool takes a share of what is free: here less than one 256-token sequence.
    (cg / "memory.max").write_text(f"{200 * per_token}\n")
    with pytest.raises(KVCacheTooLargeError, match="less than one sequence"):
        Engine(loaded, max_batch_size=4, max_model_len=256)
    # Room for one KV cache and half a model: the engine starts; a reload (both models live) is refused.
    (cg / "memory.max").write_text(f"{int((kv + weights // 2) / 0.9)}\n")
    eng = Engine(loaded, max_batch_size=4, max_model_len=256, kv_cache_memory=kv)
    await eng.start()
    try:
        with pytest.raises(InsufficientMemoryError, match="restart"):
            await eng.reload(tiny_model_dir, revision="v2")
        assert eng.stats().num_models == 1 and eng.revision == ""
        _, _, last = await collect(eng, "still-serving", [5, 6], SamplingParams(max_tokens=2, temperature=0,
                                                                                 ignore_eos=True))
        assert last.finish_reason == "length"
        (cg / "memory.max").write_text("max\n")
        await eng.reload(tiny_model_dir, revision="v2")
        assert eng.revision == "v2"
    finally:
        await eng.stop()
