"""Repetition, frequency and presence penalties, per row of a batch (vLLM's semantics).

- `repetition_penalty` (vLLM / Hugging Face, CTRL paper): every token id that occurs in the prompt
  *or* the output so far has its logit divided by the penalty when positive, multiplied when
  negative. 1.0 disables it. Same rule as `transformers.RepetitionPenaltyLogitsProcessor`.
- `frequency_penalty` (OpenAI): `logit -= frequency_penalty * count(id in the output so far)`.
- `presence_penalty` (OpenAI): `logit -= presence_penalty * (count > 0)`.
  Both count generated tokens only, never the prompt. 0.0 disables them.

Order (vLLM's `apply_penalties`): repetition first, then frequency and presence, all before
temperature / top-k / top-p and greedy argmax.

State is kept per request and updated incrementally: `PenaltyState` holds a dense count of the
output token ids (one row of `vocab` floats on the model's device) and, only when a repetition
penalty is set, a mask of the prompt's ids. Each step adds the tokens sampled since the last step,
so the cost per step is O(new tokens) plus one stack of the penalized rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PenaltyBatch", "PenaltyState", "apply_penalties", "build_penalty_batch", "penalty_batch_for"]


class PenaltyState:
    """Per-request penalty bookkeeping; create it lazily, on the engine thread."""

    __slots__ = ("counts", "prompt_mask", "num_counted")

    def __init__(self, prompt_token_ids: list[int], vocab_size: int, device: torch.device, with_prompt: bool) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.prompt_mask: torch.Tensor | None = None
        if with_prompt:
            ids = torch.tensor([t for t in prompt_token_ids if 0 <= t < vocab_size], dtype=torch.long)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.prompt_mask[ids.to(device)] = True
        self.num_counted = 0

    def update(self, output_token_ids: list[int]) -> None:
        new = [t for t in output_token_ids[self.num_counted :] if 0 <= t < self.counts.shape[0]]
        self.num_counted = len(output_token_ids)
        if new:
            idx = torch.tensor(new, dtype=torch.long).to(self.counts.device, non_blocking=True)
            self.counts.index_add_(0, idx, torch.ones(len(new), dtype=self.counts.dtype, device=self.counts.device))


@dataclass
class PenaltyBatch:
    rows: torch.Tensor  # [k] rows of the step's logits that carry a penalty
    counts: torch.Tensor  # [k, V] output token counts
    prompt_mask: torch.Tensor | None  # [k, V] prompt ids (only when some row has a repetition penalty)
    repetition: torch.Tensor  # [k]
    frequency: torch.Tensor  # [k]
    presence: torch.Tensor  # [k]


def build_penalty_batch(
    rows: list[int], states: list[PenaltyState], params: list, device: torch.device
) -> PenaltyBatch | None:
    """`rows[i]` is the logits row of a request with `states[i]` (already updated) and sampling
    `params[i]` (`repetition_penalty`, `frequency_penalty`, `presence_penalty`)."""
    if not rows:
        return None
    counts = torch.stack([s.counts for s in states])
    prompt_mask = None
    if any(p.repetition_penalty != 1.0 for p in params):
        vocab = counts.shape[1]
        prompt_mask = torch.stack(
            [
                s.prompt_mask if s.prompt_mask is not None else torch.zeros(vocab, dtype=torch.bool, device=device)
                for s in states
            ]
        )

    def col(name: str) -> torch.Tensor:
        return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32).to(
            device, non_blocking=True
        )

    return PenaltyBatch(
        rows=torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        counts=counts,
        prompt_mask=prompt_mask,
        repetition=col("repetition_penalty"),
        frequency=col("frequency_penalty"),
        presence=col("presence_penalty"),
    )


def apply_penalties(logits: torch.Tensor, batch: PenaltyBatch) -> None:
    """Apply `batch` to `logits` ([n, V], modified in place) in float32."""
    sub = logits.index_select(0, batch.rows).float()
    vocab = sub.shape[1]
    counts = batch.counts[:, :vocab]
    if batch.prompt_mask is not None:
        seen = batch.prompt_mask[:, :vocab] | (counts > 0)
        rep = batch.repetition.unsqueeze(1)
        penalized = torch.where(sub < 0, sub * rep, sub / rep)
        sub = torch.where(seen, penalized, sub)
    sub = sub - batch.frequency.unsqueeze(1) * counts
    sub = sub - batch.presence.unsqueeze(1) * (counts > 0).to(sub.dtype)
    logits.index_copy_(0, batch.rows, sub.to(logits.dtype))


def penalty_batch_for(seqs: list, states: list, vocab_size: int, device: torch.device) -> PenaltyBatch | None:
    """The `PenaltyBatch` of one step: `seqs[i]` (a scheduler `Sequence`) is sampled from logits
    row i with `states[i]` (a `SamplingState`). Creates and updates each request's `PenaltyState`."""
    rows, pstates, params = [], [], []
    for i, (seq, st) in enumerate(zip(seqs, states, strict=True)):
        p = st.params
        if not p.has_penalties:
            continue
        if st.penalty is None:
            st.penalty = PenaltyState(seq.prompt_token_ids, vocab_size, device, with_prompt=p.repetition_penalty != 1.0)
        st.penalty.update(seq.output_token_ids)
        rows.append(i)
        pstates.append(st.penalty)
        params.append(p)
    return build_penalty_batch(rows, pstates, params, device)
