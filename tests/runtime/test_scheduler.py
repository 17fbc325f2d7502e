"""Scheduler unit tests: pure Python, no torch (the scheduler must stay importable without it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoglm_runtime.scheduler import FinishReason, QueueFullError, Scheduler, Sequence


def seq(rid: str, prompt_len: int = 4, max_tokens: int = 8, priority: int = 0, **kw) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)), max_tokens=max_tokens, priority=priority, eos_token_ids=frozenset({2}), **kw)


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.update_from_output(out, [token] * len(out.sampled_sequences))
    return out


def test_join_decode_and_leave():
    s = Scheduler(max_batch_size=2, max_queue=8, max_batch_tokens=64, max_model_len=128)
    a, b, c = seq("a", max_tokens=2), seq("b", max_tokens=3), seq("c", max_tokens=1)
    for x in (a, b, c):
        s.add_request(x)
    assert (s.num_waiting, s.num_running) == (3, 0)

    out = s.schedule()  # a and b admitted (2 slots), prefilled whole
    assert [c.seq.request_id for c in out.prefills] == ["a", "b"] and not out.decodes
    assert all(ch.samples and ch.start == 0 and ch.num_tokens == 4 for ch in out.prefills)
    assert (a.slot, b.slot) == (0, 1) and s.num_waiting == 1
    s.update_from_output(out, [7, 7])
    assert a.output_token_ids == [7] and a.num_computed_tokens == 4

    out = step(s)  # both decode; a reaches max_tokens=2 and leaves
    assert [x.request_id for x in out.decodes] == ["a", "b"]
    assert a.is_finished and a.finish_reason == FinishReason.LENGTH and a.slot is None
    assert b.slot == 0  # compacted into the hole
    out = s.schedule()  # c joins while b decodes; b's KV moves 1 -> 0 first
    assert [(m.src, m.dst, m.seq.request_id) for m in out.moves] == [(1, 0, "b")]
    assert [x.request_id for x in out.decodes] == ["b"] and out.prefills[0].seq is c and c.slot == 1
    s.update_from_output(out, [7, 7])
    assert b.finish_reason == FinishReason.LENGTH and c.finish_reason == FinishReason.LENGTH
    assert not s.has_work() and s.num_running == 0


def test_token_budget_chunks_long_prompts_without_stalling_decodes():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=16, max_model_len=256)
    short = seq("short", prompt_len=3, max_tokens=10)
    s.add_request(short)
    step(s)
    long = seq("long", prompt_len=40)
    s.add_request(long)
    starts = []
    while long.is_prefilling:
        out = s.schedule()
        assert out.num_batched_tokens <= 16
        assert short in out.decodes  # the running decode is never stalled
        chunk = out.prefills[0]
        starts.append((chunk.start, chunk.num_tokens, chunk.samples))
        s.update_from_output(out, [7] * len(out.sampled_sequences))
    assert starts == [(0, 15, False), (15, 15, False), (30, 10, True)]
    assert long.output_token_ids == [7]


def test_no_chunking_mode_admits_whole_prompts():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=16, max_model_len=256, chunked_prefill=False)
    s.add_request(seq("a", prompt_len=10))
    s.add_request(seq("b", prompt_len=10))
    out = s.schedule()
    assert [c.num_tokens for c in out.prefills] == [10]  # b does not fit this step
    s.update_from_output(out, [7])
    out = s.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["b"] and out.prefills[0].num_tokens == 10


def test_priorities_lower_first_then_fcfs():
    s = Scheduler(max_batch_size=1, max_queue=8, max_batch_tokens=64, max_model_len=128)
    for rid, prio in [("p5a", 5), ("p0a", 0), ("pm1", -1), ("p0b", 0), ("p5b", 5)]:
        s.add_request(seq(rid, priority=prio, max_tokens=1))
    order = []
    while s.has_work():
        out = step(s)
        order += [c.seq.request_id for c in out.prefills]
    assert order == ["pm1", "p0a", "p0b", "p5a", "p5b"]


def test_queue_full_and_validation():
    s = Scheduler(max_batch_size=1, max_queue=2, max_batch_tokens=8, max_model_len=16)
    s.add_request(seq("a"))
    s.add_request(seq("b"))
    with pytest.raises(QueueFullError):
        s.add_request(seq("c"))
    step(s)  # a admitted: the queue has room again
    s.add_request(seq("c"))
    with pytest.raises(ValueError):
        s.add_request(seq("c"))  # duplicate id
    with pytest.raises(ValueError):
        s.add_request(seq("long", prompt_len=16))
    with pytest.raises(ValueError):
        s.add_request(Sequence("empty", [], max_tokens=1))
    with pytest.raises(ValueError):
        Scheduler(max_batch_size=8, max_batch_tokens=4)


def test_abort_frees_slot_at_once_and_waiting_entries():
    s = Scheduler(max_batch_size=2, max_queue=8, max_batch_tokens=64, max_model_len=128)
    a, b, c = seq("a", max_tokens=50), seq("b", max_tokens=50), seq("c", max_tokens=50)
    for x in (a, b, c):
        s.add_request(x)
    out = s.schedule()
    assert s.num_running == 2 and s.num_waiting == 1
    s.abort("a")  # while its step is "in flight"
    assert s.num_running == 1 and a.finish_reason == FinishReason.ABORT and b.slot == 0
    s.update_from_output(out, [7, 7])  # the in-flight result for a is dropped
    assert a.output_token_ids == [] and b.output_token_ids == [7]
    s.abort("c")  # waiting request
    assert s.num_waiting == 0 and c.finish_reason == FinishReason.ABORT
    out = s.schedule()
    assert [m.dst for m in out.moves] == [0] and out.decodes == [b] and not out.prefills
    s.abort("unknown")  # ignored
    s.abort("a")  # twice: ignored
    s.update_from_output(out, [7])
    s.abort("b")
    assert not s.has_work() and s.kv_cache_usage == 0


def test_finish_reasons():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=10)
    eos = seq("eos", max_tokens=5)
    ign = seq("ignore", max_tokens=2, ignore_eos=True)
    stop_tok = seq("stoptok", max_tokens=5, stop_token_ids=frozenset({9}))
    ctx = seq("ctx", prompt_len=8, max_tokens=100)
    for x in (eos, ign, stop_tok, ctx):
        s.add_request(x)
    out = s.schedule()
    s.update_from_output(out, [2, 2, 9, 7])
    assert eos.finish_reason == FinishReason.STOP and eos.output_token_ids == [2]
    assert stop_tok.finish_reason == FinishReason.STOP
    assert not ign.is_finished  # eos ignored
    out = step(s)
    assert ign.finish_reason == FinishReason.LENGTH and ign.output_token_ids == [2, 7]
    assert ctx.finish_reason == FinishReason.LENGTH and ctx.num_tokens == 10  # hit max_model_len
    s2 = Scheduler(max_batch_size=1, max_queue=1, max_batch_tokens=8, max_model_len=64)
    x = seq("x")
    s2.add_request(x)
    step(s2)
    s2.finish(x, FinishReason.STOP)  # e.g. a stop string matched
    assert x.finish_reason == FinishReason.STOP and s2.num_running == 0


def test_usage_counters():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=100)
    s.add_request(seq("a", prompt_len=10))
    s.add_request(seq("b", prompt_len=30))
    step(s)
    assert s.slot_usage == 0.5
    assert s.kv_cache_usage == pytest.approx(40 / 400)
    step(s)
    assert s.kv_cache_usage == pytest.approx(42 / 400)


def test_slot_compaction_chain_of_moves():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=100)
    xs = [seq(str(i), max_tokens=50) for i in range(4)]
    for x in xs:
        s.add_request(x)
    step(s)
    s.abort("0")  # 3 -> 0
    s.abort("1")  # 2 -> 1
    s.abort("3")  # now at 0; 1 ("2") -> 0
    out = s.schedule()
    assert [(m.src, m.dst, m.seq.request_id) for m in out.moves] == [(3, 0, "3"), (2, 1, "2"), (1, 0, "2")]
    assert xs[2].slot == 0 and s.num_running == 1


def test_scheduler_imports_without_torch():
    code = "import sys, autoglm_runtime.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
