"""Iteration-level (continuous-batching) scheduler. Pure Python: no torch here.

The engine calls, once per step:

    out = scheduler.schedule()          # which sequences run this step and how many tokens each
    ... the model runner executes `out` (applying `out.moves` to the KV cache first) ...
    scheduler.update_from_output(out, sampled_token_ids)

Model of the KV cache this scheduler assumes (see model_runner.py): a preallocated *slot* cache
with `max_batch_size` slots of `max_model_len` positions each. A running sequence owns one slot
for its whole life, so there is never KV memory pressure and never preemption: admission is
bounded by free slots only. Slots are kept dense — slots `0..num_running-1` are the ones in use —
so the decode attention can run on a contiguous view of the cache. When a sequence leaves, the
sequence in the last slot moves into the hole; the scheduler records that as a `SlotMove` which
the runner applies (a KV copy) before its next forward.

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

__all__ = [
    "FinishReason",
    "QueueFullError",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "SlotMove",
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

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    slot: int | None = None
    # Number of tokens whose K/V are in the cache. Decoding sequences keep the invariant
    # num_computed_tokens == num_tokens - 1 (the last sampled token is the next input).
    num_computed_tokens: int = 0
    first_scheduled_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` prompt tokens of `seq` starting at position `start` are prefilled this step.
    `samples` is True when the chunk completes the prompt (its last logits give the first token)."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


@dataclass(frozen=True)
class SlotMove:
    """Copy the KV of slot `src` into slot `dst` (positions < seq.num_computed_tokens)."""

    src: int
    dst: int
    seq: Sequence


@dataclass
class SchedulerOutput:
    decodes: list[Sequence]  # one token each, in slot order
    prefills: list[ScheduledChunk]
    moves: list[SlotMove]  # apply in order, before the forward
    num_batched_tokens: int

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
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_tokens < max_batch_size:
            raise ValueError("max_batch_tokens must be >= max_batch_size (every running sequence decodes each step)")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.chunked_prefill = chunked_prefill

        self._waiting: list[tuple[int, int, Sequence]] = []  # heap (priority, arrival counter, seq)
        self._waiting_by_id: dict[str, Sequence] = {}
        self._slots: list[Sequence] = []  # dense: index == seq.slot
        self._by_id: dict[str, Sequence] = {}
        self._pending_moves: list[SlotMove] = []
        self._counter = itertools.count()

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self._waiting_by_id)

    @property
    def num_running(self) -> int:
        return len(self._slots)

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + self.num_running

    def has_work(self) -> bool:
        return bool(self._slots) or bool(self._waiting_by_id)

    @property
    def slot_usage(self) -> float:
        return len(self._slots) / self.max_batch_size

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the slot cache's token positions holding live KV (0..1)."""
        used = sum(s.num_computed_tokens for s in self._slots)
        return used / (self.max_batch_size * self.max_model_len)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def running(self) -> list[Sequence]:
        return list(self._slots)

    # ------------------------------------------------------------------ mutation
    def add_request(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        check_lengths(seq.prompt_len, None, self.max_model_len)  # InvalidRequestError (a ValueError)
        if len(self._waiting_by_id) >= self.max_queue:
            raise QueueFullError(f"queue is full ({self.max_queue} waiting requests)")
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self._waiting, (seq.priority, next(self._counter), seq))
        self._waiting_by_id[seq.request_id] = seq
        self._by_id[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish `request_id` with reason "abort" and free its slot at once. Unknown ids are ignored."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` (e.g. a stop string matched) and free its slot or queue entry."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)
        if self._waiting_by_id.pop(seq.request_id, None) is not None:
            return  # its heap entry is skipped lazily
        if seq.slot is not None:
            self._free_slot(seq)

    def _free_slot(self, seq: Sequence) -> None:
        hole = seq.slot
        assert hole is not None and self._slots[hole] is seq
        last = self._slots.pop()
        if last is not seq:
            self._slots[hole] = last
            self._pending_moves.append(SlotMove(src=last.slot, dst=hole, seq=last))  # type: ignore[arg-type]
            last.slot = hole
        seq.slot = None

    def _pop_waiting(self) -> Sequence | None:
        while self._waiting:
            _, _, seq = self._waiting[0]
            if seq.is_finished or seq.request_id not in self._waiting_by_id:
                heapq.heappop(self._waiting)
                continue
            return seq
        return None

    def schedule(self) -> SchedulerOutput:
        budget = self.max_batch_tokens
        decodes: list[Sequence] = []
        partial: list[Sequence] = []
        for seq in self._slots:
            (partial if seq.is_prefilling else decodes).append(seq)
        budget -= len(decodes)
        prefills: list[ScheduledChunk] = []

        # Continue prompts already being prefilled (they own slots) before admitting new ones.
        partial.sort(key=lambda s: (s.priority, s.arrival_time))
        for seq in partial:
            if budget <= 0:
                break
            n = min(seq.prompt_len - seq.num_computed_tokens, budget)
            prefills.append(
                ScheduledChunk(seq, seq.num_computed_tokens, n, n == seq.prompt_len - seq.num_computed_tokens)
            )
            budget -= n

        now = time.monotonic()
        while budget > 0 and len(self._slots) < self.max_batch_size:
            waiting = self._pop_waiting()
            if waiting is None:
                break
            seq = waiting
            remaining = seq.prompt_len - seq.num_computed_tokens
            if remaining > budget and not self.chunked_prefill:
                # Without chunking a prompt waits for a step with enough budget; one that can
                # never fit is admitted alone rather than starving.
                if decodes or prefills:
                    break
            heapq.heappop(self._waiting)
            del self._waiting_by_id[seq.request_id]
            seq.status = SequenceStatus.RUNNING
            seq.slot = len(self._slots)
            self._slots.append(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            n = min(remaining, budget) if self.chunked_prefill else remaining
            prefills.append(ScheduledChunk(seq, seq.num_computed_tokens, n, n == remaining))
            budget -= n

        decodes.sort(key=lambda s: s.slot)  # type: ignore[arg-type, return-value]
        moves, self._pending_moves = self._pending_moves, []
        return SchedulerOutput(
            decodes=decodes,
            prefills=prefills,
            moves=moves,
            num_batched_tokens=len(decodes) + sum(c.num_tokens for c in prefills),
        )

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Iterable[int]) -> list[Sequence]:
        """Advance the sequences of `output`. `sampled_token_ids` holds one token per entry of
        `output.sampled_sequences`, in that order. Returns the sequences that received a token
        (including ones that finished with it); sequences aborted meanwhile are skipped."""
        for seq in output.decodes:
            if not seq.is_finished:
                seq.num_computed_tokens += 1
        for chunk in output.prefills:
            if not chunk.seq.is_finished:
                chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens

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
