"""Iteration-level (continuous-batching) scheduler over a paged KV cache. Pure Python: no torch here.

The engine calls, once per step:

    out = scheduler.schedule()          # which sequences run this step and how many tokens each
    ... the model runner executes `out` (writing K/V into the blocks of each sequence) ...
    scheduler.update_from_output(out, sampled_token_ids)

KV memory is a pool of blocks (`kv_cache.BlockManager`): a sequence holds the blocks its tokens
need, taken as it grows. Admission is bounded by free blocks (and `max_batch_size`), not by
reserved `max_model_len` slots. With prefix caching, a new sequence first takes the cached blocks
that match its prompt and prefills only the rest.

When a running sequence needs a block and none is free (cached blocks nobody holds are evicted
first), the *newest* running sequence is preempted: its blocks are released and it goes back to
the front of the waiting queue with its tokens so far; when readmitted it recomputes prompt +
output (most of it from the prefix cache while that still holds it) and then decodes on. Nothing is
dropped and memory never runs out (the pool is checked to hold at least one `max_model_len`
sequence). `num_preemptions` counts them.

Per step the token budget is `max_batch_tokens`: every decoding sequence gets one token, the rest
of the budget goes to prefill. Prompts longer than what is left are prefilled in chunks over
several steps (chunked prefill), so a long prompt never stalls running decodes.

Waiting requests are admitted by `priority` (lower first), first-come-first-served within a level.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .engine_api import QueueFullError, check_lengths
from .kv_cache import BlockManager

__all__ = [
    "FinishReason",
    "QueueFullError",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason:
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the client or the engine


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. `data` is an opaque payload for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    data: Any = None
    mm: Any = None  # multimodal inputs of the prompt (vision.MultiModalInputs), opaque here
    mm_spans: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, hash) per image
    cache_salt: str | None = None  # mixed into the first block's hash (tenants apart)

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    # Number of tokens whose K/V are in the cache. Decoding sequences keep the invariant
    # num_computed_tokens == num_tokens - 1 (the last sampled token is the next input).
    num_computed_tokens: int = 0
    first_scheduled_time: float | None = None
    # Paged KV (kv_cache.BlockManager): the blocks holding this sequence's tokens, the chained hashes
    # of its full blocks, how many of its blocks are published in the prefix cache.
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache at first admission
    num_preemptions: int = 0
    order: int = 0  # arrival order (kept across preemptions)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to compute before decoding: the prompt, or after a preemption everything but the
        last sampled token (that one is the next decode's input)."""
        return self.num_tokens - 1 if self.output_token_ids else self.prompt_len

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end-1`` of prompt + output."""
        n = self.prompt_len
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at position `start` are prefilled this step.
    `samples` is True when the chunk completes the prompt (its last logits give the first token);
    a chunk that completes a preempted sequence's recompute samples nothing (it decodes next)."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


@dataclass
class SchedulerOutput:
    decodes: list[Sequence]  # one token each
    prefills: list[ScheduledChunk]
    num_batched_tokens: int
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue this step

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    @property
    def sampled_sequences(self) -> list[Sequence]:
        """The sequences that get a token from this step, in the order the runner returns them."""
        return self.decodes + [c.seq for c in self.prefills if c.samples]


class Scheduler:
    def __init__(
        self,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_batch_tokens: int = 2048,
        max_model_len: int = 2048,
        chunked_prefill: bool = True,
        num_blocks: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_tokens < max_batch_size:
            raise ValueError("max_batch_tokens must be >= max_batch_size (every running sequence decodes each step)")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if num_blocks is None:  # as much as the slot cache held: every sequence at max_model_len
            num_blocks = max_batch_size * -(-max_model_len // block_size) + 1
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.chunked_prefill = chunked_prefill
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        if self.blocks.num_usable_blocks * block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {self.blocks.num_usable_blocks * block_size} tokens, less than one "
                f"sequence of max_model_len={max_model_len}"
            )

        self._waiting: list[tuple[int, int, Sequence]] = []  # heap (priority, arrival order, seq)
        self._waiting_by_id: dict[str, Sequence] = {}
        self._running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._by_id: dict[str, Sequence] = {}
        self._counter = itertools.count()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self._waiting_by_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + self.num_running

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting_by_id)

    @property
    def slot_usage(self) -> float:
        return len(self._running) / self.max_batch_size

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV blocks held by sequences (0..1); cached blocks nobody holds are free."""
        return self.blocks.usage

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def running(self) -> list[Sequence]:
        return list(self._running)

    # ------------------------------------------------------------------ mutation
    def add_request(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        check_lengths(seq.prompt_len, None, self.max_model_len)  # InvalidRequestError (a ValueError)
        if len(self._waiting_by_id) >= self.max_queue:
            raise QueueFullError(f"queue is full ({self.max_queue} waiting requests)")
        seq.order = next(self._counter)
        self._enqueue(seq)
        self._by_id[seq.request_id] = seq

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self._waiting, (seq.priority, seq.order, seq))
        self._waiting_by_id[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish `request_id` with reason "abort" and free its blocks at once. Unknown ids are ignored."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` (e.g. a stop string matched) and free its blocks or queue entry."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)
        if self._waiting_by_id.pop(seq.request_id, None) is not None:
            return  # its heap entry is skipped lazily
        self._running.remove(seq)
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _pop_waiting(self) -> Sequence | None:
        while self._waiting:
            _, _, seq = self._waiting[0]
            if seq.is_finished or self._waiting_by_id.get(seq.request_id) is not seq:
                heapq.heappop(self._waiting)
                continue
            return seq
        return None

    def _grow(self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Blocks for ``num_tokens`` tokens of running ``seq``, preempting the newest running sequence not
        scheduled this step while they are short. False when ``seq`` itself had to go."""
        while not self.blocks.allocate(seq, num_tokens):
            victim = next((s for s in reversed(self._running) if id(s) not in scheduled), seq)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decodes=[], prefills=[], num_batched_tokens=0)
        budget = self.max_batch_tokens
        scheduled: set[int] = set()
        # 1. Every decoding sequence gets its token (oldest first: the newest are preempted for them).
        for seq in list(self._running):
            if seq.is_prefilling or seq.status is not SequenceStatus.RUNNING:
                continue
            if self._grow(seq, seq.num_computed_tokens + 1, scheduled, out):
                out.decodes.append(seq)
                scheduled.add(id(seq))
                budget -= 1
        # 2. Prompts already being prefilled continue before new ones are admitted.
        partial = sorted((s for s in self._running if s.is_prefilling), key=lambda s: (s.priority, s.order))
        for seq in partial:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one
                continue
            n = min(seq.prefill_len - seq.num_computed_tokens, budget)
            if self._grow(seq, seq.num_computed_tokens + n, scheduled, out):
                out.prefills.append(self._chunk(seq, n))
                scheduled.add(id(seq))
                budget -= n
        # 3. Admit waiting sequences while budget, batch room and free blocks last (no preemption here).
        now = time.monotonic()
        while budget > 0 and len(self._running) < self.max_batch_size and not out.preempted:
            head = self._pop_waiting()
            if head is None:
                break
            seq = head
            target = seq.prefill_len
            cached = self.blocks.match(seq, target)
            start = len(cached) * self.blocks.block_size
            remaining = target - start
            if remaining > budget and not self.chunked_prefill and (out.decodes or out.prefills):
                break  # without chunking a prompt waits for a step with room; alone it always goes
            n = min(remaining, budget) if self.chunked_prefill else remaining
            if not self.blocks.allocate(seq, start + n, cached):
                break
            self.blocks.count_query(target, start)
            heapq.heappop(self._waiting)
            del self._waiting_by_id[seq.request_id]
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = start
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = start
            self._running.append(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            out.prefills.append(self._chunk(seq, n))
            budget -= n
        out.num_batched_tokens = len(out.decodes) + out.num_prefill_tokens
        return out

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> ScheduledChunk:
        completes = seq.num_computed_tokens + n == seq.prefill_len
        return ScheduledChunk(seq, seq.num_computed_tokens, n, completes and not seq.output_token_ids)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Iterable[int]) -> list[Sequence]:
        """Advance the sequences of `output`. `sampled_token_ids` holds one token per entry of
        `output.sampled_sequences`, in that order. Returns the sequences that received a token
        (including ones that finished with it); sequences aborted meanwhile are skipped."""
        for seq in output.decodes:
            if not seq.is_finished:
                seq.num_computed_tokens += 1
                self.blocks.register_computed(seq)
        for chunk in output.prefills:
            if not chunk.seq.is_finished:
                chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
                self.blocks.register_computed(chunk.seq)

        updated: list[Sequence] = []
        for seq, token in zip(output.sampled_sequences, sampled_token_ids, strict=True):
            if seq.is_finished:
                continue
            seq.output_token_ids.append(token)
            updated.append(seq)
            reason = self.check_stop(seq, token)
            if reason is not None:
                self.finish(seq, reason)
        return updated

    def check_stop(self, seq: Sequence, token: int) -> str | None:
        if (not seq.ignore_eos and token in seq.eos_token_ids) or token in seq.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
