"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-sequence block tables and
automatic prefix caching. Pure Python: no torch here (the tensors live in model_runner.py).

The pool holds ``num_blocks`` blocks of ``block_size`` token positions each; block 0 is the *null
block* (never handed out, kept zero: padded positions of a gather read it). A sequence owns the
list of blocks that hold its tokens (``seq.block_ids``: position ``p`` lives in slot
``block_ids[p // block_size] * block_size + p % block_size``).

Prefix caching (on unless ``enable_caching=False``):

* Every *full* block of a sequence has a hash chained over its prefix:
  ``H(parent hash, the block's token ids, extra keys)``. The extra keys of a block are the content
  hashes of the images whose tokens overlap it (image tokens are all the same placeholder id, so
  without this two different screenshots behind the same text would share KV). The first block's
  parent is the request's ``cache_salt`` (None: no salt), which keeps tenants apart.
* Once the KV of a full block is computed, the block is registered in ``hash -> block``. A new
  sequence takes the longest run of registered blocks matching its own hashes, at most
  ``num_tokens - 1`` tokens (the last one must run to give logits) and never ending inside an
  image (the match is cut back to the block boundary before the image).
* Blocks are refcounted; shared blocks are always full and never written again. A block whose
  count drops to 0 keeps its KV and its hash and goes to the tail of the free list (a sequence's
  last blocks first, so the tail of a prefix is evicted before its head); allocation takes blocks
  from the head (least recently used) and forgets their hash then (eviction).

Counters: ``queries``/``hits`` in tokens (prompt tokens looked up / found), ``evictions`` in blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import Protocol

__all__ = ["BlockManager", "BlockSequence", "NULL_BLOCK"]

NULL_BLOCK = 0


class BlockSequence(Protocol):
    """What the manager reads and writes on a sequence (``scheduler.Sequence``)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    block_hashes: list[bytes]
    num_registered_blocks: int
    mm_spans: list[tuple[int, int, str]]  # (start, end, content hash) of each image's tokens
    cache_salt: str | None


def _token(seq: BlockSequence, i: int) -> int:
    n = len(seq.prompt_token_ids)
    return seq.prompt_token_ids[i] if i < n else seq.output_token_ids[i - n]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # ... of which found there
        self.evictions = 0  # cached blocks whose KV was dropped to make room

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq: BlockSequence, pos: int) -> int:
        return seq.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    # ------------------------------------------------------------------ hashing
    def _extend_hashes(self, seq: BlockSequence, num_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            s, e = i * bs, (i + 1) * bs
            h = hashlib.blake2b(digest_size=16)
            if i:
                h.update(hashes[-1])
            elif seq.cache_salt is not None:
                h.update(b"salt:" + seq.cache_salt.encode())
            h.update(struct.pack(f"<{bs}q", *(_token(seq, j) for j in range(s, e))))
            for start, end, image in seq.mm_spans:
                if start < e and end > s:
                    h.update(b"image:" + image.encode())
            hashes.append(h.digest())

    def _cut_before_images(self, seq: BlockSequence, num_tokens: int) -> int:
        for start, end, _ in seq.mm_spans:
            if start < num_tokens < end:
                num_tokens = start // self.block_size * self.block_size
        return num_tokens

    def match(self, seq: BlockSequence, num_tokens: int) -> list[int]:
        """The cached blocks that hold the longest reusable prefix of the first ``num_tokens`` tokens of
        ``seq`` (nothing is taken yet: pass them to ``allocate``). Counts a query of ``num_tokens``."""
        if not self.enable_caching:
            return []
        limit = (num_tokens - 1) // self.block_size  # at least one token is left to compute
        self._extend_hashes(seq, limit)
        found: list[int] = []
        for h in seq.block_hashes[:limit]:
            b = self._cached.get(h)
            if b is None:
                break
            found.append(b)
        keep = self._cut_before_images(seq, len(found) * self.block_size) // self.block_size
        return found[:keep]

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_tokens
        self.hits += num_hit_tokens

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, seq: BlockSequence, num_tokens: int, cached: Seq[int] = ()) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens after taking ``cached`` (from ``match``)."""
        need = self.blocks_for(num_tokens) - len(seq.block_ids) - len(cached)
        reclaimed = sum(1 for b in cached if self._ref[b] == 0)  # cached blocks are counted as free now
        return need <= len(self._free) - reclaimed

    def allocate(self, seq: BlockSequence, num_tokens: int, cached: Seq[int] = ()) -> bool:
        """Gives ``seq`` the ``cached`` blocks, then fresh ones until it can hold ``num_tokens``. False
        (and nothing changed) when there are not enough free blocks."""
        if not self.can_allocate(seq, num_tokens, cached):
            return False
        for b in cached:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            seq.block_ids.append(b)
        if cached:
            seq.num_registered_blocks = len(seq.block_ids)
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_ids)):
            b, _none = self._free.popitem(last=False)
            old = self._hash[b]
            if old is not None:
                self._hash[b] = None
                if self._cached.get(old) == b:
                    del self._cached[old]
                self.evictions += 1
            self._ref[b] = 1
            seq.block_ids.append(b)
        return True

    def free(self, seq: BlockSequence) -> None:
        """Drops ``seq``'s hold on its blocks (last block first onto the free list)."""
        for b in reversed(seq.block_ids):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:  # nothing worth keeping: first in line for reuse
                    self._free[b] = None
                    self._free.move_to_end(b, last=False)
                else:
                    self._free[b] = None
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def register_computed(self, seq: BlockSequence) -> None:
        """Publishes ``seq``'s blocks that are full and computed (call after each step)."""
        if not self.enable_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            b, h = seq.block_ids[i], seq.block_hashes[i]
            if self._hash[b] is None and h not in self._cached:
                self._hash[b] = h
                self._cached[h] = b
        seq.num_registered_blocks = full
