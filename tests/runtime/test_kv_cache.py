"""BlockManager unit tests: pure Python, no torch (the block manager must stay importable without it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoglm_runtime.kv_cache import BlockManager
from autoglm_runtime.scheduler import Sequence

BS = 4
IMG = 9  # the image placeholder token


def seq(tokens, spans=(), salt=None, rid="r") -> Sequence:
    return Sequence(rid, list(tokens), max_tokens=4, mm_spans=list(spans), cache_salt=salt)


def run(m: BlockManager, s: Sequence) -> list[int]:
    """Admit `s` as the scheduler does, compute its whole prompt, return the cached blocks it took."""
    cached = m.match(s, s.prompt_len)
    assert m.allocate(s, s.prompt_len, cached)
    s.num_computed_tokens = s.prompt_len
    m.register_computed(s)
    return cached


def test_shared_prefix_is_matched_in_whole_blocks_and_refcounted():
    m = BlockManager(num_blocks=16, block_size=BS)
    a = seq(range(10, 22), rid="a")  # 12 tokens: 3 full blocks
    assert run(m, a) == [] and m.num_cached_blocks == 3
    b = seq(list(range(10, 20)) + [1, 2, 3], rid="b")  # shares 10 tokens: 2 whole blocks
    got = run(m, b)
    assert got == a.block_ids[:2] and b.block_ids[:2] == a.block_ids[:2]
    assert m.num_used_blocks == 3 + 2  # b's shared blocks are not copied
    m.free(a)
    assert m.num_used_blocks == 4  # the two shared blocks are still held by b
    m.free(b)
    assert m.num_used_blocks == 0 and m.num_cached_blocks == 4  # a's 3 + b's third full block


def test_full_prompt_match_leaves_the_last_token_to_compute():
    m = BlockManager(num_blocks=16, block_size=BS)
    run(m, seq(range(10, 18), rid="a"))  # 8 tokens: 2 blocks
    assert len(m.match(seq(range(10, 18), rid="b"), 8)) == 1  # at most 7 tokens -> 1 whole block
    assert len(m.match(seq(range(10, 19), rid="c"), 9)) == 2


def test_different_images_behind_identical_tokens_never_share():
    m = BlockManager(num_blocks=32, block_size=BS)
    tokens = [1, 2] + [IMG] * 8 + [3, 4, 5, 6, 7, 8]  # image tokens 2..10
    run(m, seq(tokens, [(2, 10, "screenshot-A")], rid="a"))
    # same text, same placeholder ids, another screenshot: only the block before the image may match
    other = m.match(seq(tokens, [(2, 10, "screenshot-B")], rid="b"), len(tokens))
    assert other == []  # block 0 holds tokens 0..3, which overlap the image
    same = m.match(seq(tokens, [(2, 10, "screenshot-A")], rid="c"), len(tokens))
    assert len(same) == 3  # 12 tokens, past the image


def test_a_match_never_ends_inside_an_image():
    m = BlockManager(num_blocks=32, block_size=BS)
    tokens = [1, 2, 3, 4, 5, 6] + [IMG] * 8 + [7, 8]  # image at 6..14
    spans = [(6, 14, "img")]
    run(m, seq(tokens, spans, rid="a"))
    # the same text and image, then other text: blocks 0-2 match, block 3 (image tail + text) does not,
    # so the match would end at 12, inside the image
    other = seq(tokens[:14] + [50, 51, 52], spans, rid="b")
    got = m.match(other, other.prompt_len)
    assert len(got) * BS == 4  # cut back to the block boundary before the image (6 -> 4)


def test_cache_salt_keeps_tenants_apart():
    m = BlockManager(num_blocks=16, block_size=BS)
    run(m, seq(range(10, 22), salt="tenant-a", rid="a"))
    assert m.match(seq(range(10, 22), salt="tenant-b", rid="b"), 12) == []
    assert m.match(seq(range(10, 22), rid="c"), 12) == []  # no salt is a salt of its own
    assert len(m.match(seq(range(10, 22), salt="tenant-a", rid="d"), 12)) == 2


def test_lru_eviction_takes_unreferenced_cached_blocks_tail_first():
    m = BlockManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    a = seq(range(10, 22), rid="a")  # 3 blocks
    run(m, a)
    m.free(a)
    assert m.num_free_blocks == 4 and m.num_cached_blocks == 3
    b = seq(range(100, 108), rid="b")  # needs 2 blocks: the never-used one, then a's last block
    run(m, b)
    assert m.evictions == 1 and m.num_cached_blocks == 2 + 2
    # a's first two blocks survived (the head of a prefix is evicted last)
    assert len(m.match(seq(range(10, 22), rid="c"), 12)) == 2


def test_allocation_fails_without_changes_when_blocks_run_out():
    m = BlockManager(num_blocks=4, block_size=BS)  # 3 usable
    a = seq(range(10, 18), rid="a")
    assert m.allocate(a, 8)
    b = seq(range(30, 38), rid="b")
    assert not m.can_allocate(b, 8) and not m.allocate(b, 8)
    assert b.block_ids == [] and m.num_free_blocks == 1
    assert m.allocate(b, 4)


def test_caching_off_shares_nothing():
    m = BlockManager(num_blocks=16, block_size=BS, enable_caching=False)
    run(m, seq(range(10, 22), rid="a"))
    assert m.match(seq(range(10, 22), rid="b"), 12) == [] and m.num_cached_blocks == 0


def test_null_block_is_never_handed_out():
    m = BlockManager(num_blocks=3, block_size=BS)
    a = seq(range(10, 18))
    assert m.allocate(a, 8) and 0 not in a.block_ids
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=BS)


def test_kv_cache_imports_without_torch():
    code = "import sys, autoglm_runtime.kv_cache; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
