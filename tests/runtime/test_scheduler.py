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
    assert len(a.block_ids) == 1 and len(b.block_ids) == 1 and s.num_waiting == 1
    s.update_from_output(out, [7, 7])
    assert a.output_token_ids == [7] and a.num_computed_tokens == 4

    out = step(s)  # both decode; a reaches max_tokens=2 and leaves
    assert [x.request_id for x in out.decodes] == ["a", "b"]
    assert a.is_finished and a.finish_reason == FinishReason.LENGTH and a.block_ids == []
    out = s.schedule()  # c joins while b decodes
    assert [x.request_id for x in out.decodes] == ["b"] and out.prefills[0].seq is c and c.block_ids
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


def test_new_prompt_is_prefilled_next_step_beside_a_busy_decode_batch():
    """TTFT under load: a request that arrives while many sequences decode gets its first chunk in the
    very next step (the budget left after one token per decode), and its first token as soon as its
    prompt is done, never after the decodes drain; the decodes are never skipped for it."""
    s = Scheduler(max_batch_size=8, max_queue=8, max_batch_tokens=16, max_model_len=256)
    busy = [seq(f"d{i}", prompt_len=2, max_tokens=50) for i in range(6)]
    for x in busy:
        s.add_request(x)
    step(s)  # all six prefilled (12 tokens) and decoding
    new = seq("new", prompt_len=20, max_tokens=4)
    s.add_request(new)
    out = step(s)
    assert out.decodes == busy
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.prefills] == [("new", 0, 10, False)]
    assert out.num_batched_tokens == 16
    out = step(s)
    assert out.decodes == busy and [(c.start, c.num_tokens, c.samples) for c in out.prefills] == [(10, 10, True)]
    assert new.output_token_ids == [7]  # its first token two steps after it arrived, six decodes beside it


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
    assert s.num_running == 1 and a.finish_reason == FinishReason.ABORT and a.block_ids == []
    s.update_from_output(out, [7, 7])  # the in-flight result for a is dropped
    assert a.output_token_ids == [] and b.output_token_ids == [7]
    s.abort("c")  # waiting request
    assert s.num_waiting == 0 and c.finish_reason == FinishReason.ABORT
    out = s.schedule()
    assert out.decodes == [b] and not out.prefills
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
    # 4 sequences x 100 tokens in blocks of 10: 40 usable blocks
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=100, block_size=10)
    s.add_request(seq("a", prompt_len=10))
    s.add_request(seq("b", prompt_len=30))
    step(s)
    assert s.slot_usage == 0.5
    assert s.kv_cache_usage == pytest.approx(4 / 40)  # 1 + 3 blocks
    step(s)  # both write one more token: a new block each
    assert s.kv_cache_usage == pytest.approx(6 / 40)


def test_admission_by_free_blocks_not_slots():
    # 6 usable blocks of 4 tokens: two 10-token prompts take 3 blocks each; a third waits for blocks
    s = Scheduler(max_batch_size=8, max_queue=8, max_batch_tokens=64, max_model_len=20, num_blocks=7, block_size=4)
    for rid in "abc":
        s.add_request(seq(rid, prompt_len=10, max_tokens=2))
    out = s.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["a", "b"] and s.num_waiting == 1
    s.update_from_output(out, [7, 7])
    out = step(s)  # a and b finish (max_tokens=2): their blocks come back
    assert s.num_running == 0
    out = s.schedule()
    assert [c.seq.request_id for c in out.prefills] == ["c"]


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    # 5 usable blocks of 4 tokens = 20 tokens; two sequences of 8 prompt tokens growing to 16 each
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=20, num_blocks=6, block_size=4,
                  enable_prefix_caching=False)
    a, b = seq("a", prompt_len=8, max_tokens=8, ignore_eos=True), seq("b", prompt_len=8, max_tokens=8, ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    preempted = []
    tokens = iter(range(100, 200))
    while s.has_work():
        out = s.schedule()
        preempted += [x.request_id for x in out.preempted]
        for ch in out.prefills:
            assert ch.start + ch.num_tokens <= ch.seq.prefill_len
            if ch.seq is b and b.output_token_ids:  # the recompute covers prompt + output but the last token
                assert not ch.samples and ch.seq.prefill_len == b.num_tokens - 1
        s.update_from_output(out, [next(tokens) for _ in out.sampled_sequences])
        assert len(s.blocks._free) + sum(len(x.block_ids) for x in s.running()) == 5
    assert preempted and set(preempted) == {"b"} and s.num_preemptions == len(preempted)
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 8  # nothing dropped
    assert a.finish_reason == b.finish_reason == FinishReason.LENGTH
    assert s.blocks.num_free_blocks == 5


def test_prefix_cache_reuses_blocks_of_a_finished_sequence():
    s = Scheduler(max_batch_size=4, max_queue=8, max_batch_tokens=64, max_model_len=64, block_size=4)
    a = Sequence("a", list(range(10, 30)), max_tokens=1, ignore_eos=True)  # 20 tokens: 5 full blocks
    s.add_request(a)
    step(s)
    assert a.is_finished and a.num_cached_tokens == 0 and s.blocks.num_cached_blocks == 5
    b = Sequence("b", list(range(10, 26)) + [1, 2, 3], max_tokens=1)  # shares 16 tokens = 4 blocks
    s.add_request(b)
    out = s.schedule()
    assert out.prefills[0].start == 16 and out.prefills[0].num_tokens == 3 and b.num_cached_tokens == 16
    assert (s.blocks.queries, s.blocks.hits) == (20 + 19, 16)
    c = Sequence("c", list(range(10, 30)), max_tokens=1)  # the same prompt: all but the last block's tokens
    s.add_request(c)
    out2 = s.schedule()
    assert [ch.start for ch in out2.prefills if ch.seq is c] == [16]  # 19 tokens max, in whole blocks


def test_scheduler_without_enough_blocks_for_one_sequence_is_refused():
    with pytest.raises(ValueError, match="less than one sequence"):
        Scheduler(max_batch_size=2, max_model_len=100, num_blocks=5, block_size=16)


def test_scheduler_imports_without_torch():
    code = "import sys, autoglm_runtime.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
