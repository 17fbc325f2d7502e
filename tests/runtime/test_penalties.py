"""Repetition / frequency / presence penalties: the math against transformers' own processors, and
greedy engine output (batched, with chunked prefill) against `model.generate` with the same settings."""

from __future__ import annotations

import asyncio
import random

import pytest

torch = pytest.importorskip("torch")

from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor  # noqa: E402

from autoglm_runtime.engine import Engine  # noqa: E402
from autoglm_runtime.loader import load_model  # noqa: E402
from autoglm_runtime.penalties import PenaltyState, apply_penalties, build_penalty_batch  # noqa: E402
from autoglm_runtime.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(180)]


class OpenAIPenalties(LogitsProcessor):
    """The OpenAI API's documented formula, over the generated tokens only (transformers has no
    processor for frequency/presence penalties):
    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _params(rep=1.0, freq=0.0, pres=0.0):
    return SamplingParams(
        max_tokens=8, temperature=0.0, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres
    )


def test_penalties_match_transformers_processors():
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(3, V, generator=g) * 3
    prompts = [[1, 2, 3, 3], [4, 5], [7]]
    outputs = [[3, 9, 9, 9, 11], [5, 6], []]
    settings = [(1.3, 0.5, 0.25), (0.8, -0.4, 1.0), (1.0, 0.2, 0.0)]
    states, params = [], []
    for p, o, (rep, freq, pres) in zip(prompts, outputs, settings, strict=True):
        st = PenaltyState(p, V, torch.device("cpu"), with_prompt=rep != 1.0)
        st.update(o[:2])
        st.update(o)  # incremental updates count every token once
        states.append(st)
        params.append(_params(rep, freq, pres))
    got = logits.clone()
    apply_penalties(got, build_penalty_batch([0, 1, 2], states, params, torch.device("cpu")))
    for i, (p, o, (rep, freq, pres)) in enumerate(zip(prompts, outputs, settings, strict=True)):
        ids = torch.tensor([p + o])
        want = logits[i : i + 1].clone()
        if rep != 1.0:
            want = RepetitionPenaltyLogitsProcessor(rep)(ids, want)
        want = OpenAIPenalties(len(p), freq, pres)(ids, want)
        torch.testing.assert_close(got[i : i + 1], want)
    # Frequency counts occurrences: token 9 (3 times in row 0) moved by 3 * 0.5 + presence 0.25.
    rep_applied = logits[0, 9] / 1.3 if logits[0, 9] > 0 else logits[0, 9] * 1.3
    torch.testing.assert_close(got[0, 9], rep_applied - 1.5 - 0.25)


def test_params_are_validated():
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32", device="cpu")


async def _collect(engine, rid, prompt, params):
    ids = []
    async for out in engine.generate(rid, prompt, params):
        ids += out.new_token_ids
    return ids


async def test_greedy_with_penalties_matches_generate_batched(loaded, reference):
    """Requests with different penalties (and none) share steps; a 24-token budget chunks the
    prompts. Each output equals `generate` with transformers' repetition processor and the OpenAI
    formula, and the penalties really change the output of at least one request."""
    eng = Engine(loaded, max_batch_size=4, max_queue=64, max_batch_tokens=24, max_model_len=512)
    await eng.start()
    rng = random.Random(3)
    ps = [[rng.randint(10, 300) for _ in range(rng.randint(3, 60))] for _ in range(8)]
    settings = [
        (1.0, 0.0, 0.0),
        (1.0, 0.2, 0.0),
        (1.0, 0.0, 1.5),
        (1.5, 0.0, 0.0),
        (1.2, 0.2, 0.3),
        (0.7, -0.5, 0.0),
        (1.0, 2.0, 2.0),
        (1.0, 0.2, 0.0),
    ]
    n = 24
    try:
        results = await asyncio.gather(
            *(
                _collect(
                    eng,
                    str(i),
                    p,
                    SamplingParams(
                        max_tokens=n,
                        temperature=0.0,
                        ignore_eos=True,
                        repetition_penalty=r,
                        frequency_penalty=f,
                        presence_penalty=pr,
                    ),
                )
                for i, (p, (r, f, pr)) in enumerate(zip(ps, settings, strict=True))
            )
        )
    finally:
        await eng.stop()
    changed = 0
    for p, (r, f, pr), ids in zip(ps, settings, results, strict=True):
        kwargs = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        plain = reference.model.generate(torch.tensor([p]), **kwargs)[0, len(p) :].tolist()
        ref = reference.model.generate(
            torch.tensor([p]), repetition_penalty=r, logits_processor=[OpenAIPenalties(len(p), f, pr)], **kwargs
        )[0, len(p) :].tolist()
        assert ids == ref, f"settings {(r, f, pr)} diverged from generate"
        changed += ref != plain
    assert changed >= 3, "the penalties should change several greedy outputs of a random model"
