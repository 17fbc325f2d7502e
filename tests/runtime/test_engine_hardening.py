"""Engine admission hardening on the real tiny model: a request cancelled after the engine admitted it is
aborted, an error while admitting fails that request only, and no add waits forever on a dead engine."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from autoglm_runtime import engine_output  # noqa: E402
from autoglm_runtime.engine import Engine, EngineDeadError  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture
async def engine(loaded):
    eng = Engine(loaded, max_batch_size=2, max_queue=8, max_batch_tokens=32, max_model_len=512, seed=0)
    await eng.start()
    yield eng
    await eng.stop()


async def test_request_cancelled_after_its_admission_is_set_is_aborted(engine, monkeypatch):
    task: asyncio.Task | None = None
    resolve = engine_output.resolve

    def resolve_then_cancel(fut, exc):  # the answer is set, then the waiting task is cancelled before it resumes
        resolve(fut, exc)
        assert task is not None
        task.cancel()

    monkeypatch.setattr(engine_output, "resolve", resolve_then_cancel)
    task = asyncio.create_task(engine.add_request("late-cancel", [5, 6, 7], LONG))
    with pytest.raises(asyncio.CancelledError):
        await task
    seq = engine._serving.scheduler  # the sequence must be aborted, not left running for nobody
    deadline = asyncio.get_running_loop().time() + 10
    while seq.num_unfinished and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert seq.num_unfinished == 0
    assert engine.generation_tokens_total < 400  # it did not run to max_tokens


async def test_error_while_admitting_fails_that_request_only(engine, monkeypatch):
    sched = engine._serving.scheduler
    add = sched.add_request

    def add_or_fail(seq):
        if seq.request_id == "bad":
            raise RuntimeError("admission bug")
        add(seq)

    monkeypatch.setattr(sched, "add_request", add_or_fail)
    with pytest.raises(RuntimeError, match="admission bug"):
        await engine.add_request("bad", [5, 6, 7], LONG)
    assert engine.check_health()
    outs = [o async for o in engine.generate("good", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))]
    assert outs[-1].finished and outs[-1].completion_tokens == 3


async def test_add_sent_after_the_engine_died_does_not_wait_forever(engine, monkeypatch):
    new_request = engine._admission.new_request

    def boom() -> None:
        raise RuntimeError("step loop bug")

    def admit_then_kill(*args, **kwargs):
        req = new_request(*args, **kwargs)  # checks passed: the engine was alive
        monkeypatch.setattr(engine._steps, "release_idle_models", boom)
        engine._steps.wakeup.set()
        assert engine._steps.thread is not None
        engine._steps.thread.join(10)  # ... and died before this request reached its inbox
        return req

    monkeypatch.setattr(engine._admission, "new_request", admit_then_kill)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(engine.add_request("orphan", [5, 6, 7], LONG), 10)
    assert not engine.check_health()
