"""Log-probabilities of sampled tokens (OpenAI `logprobs` / `top_logprobs`).

As vLLM does by default, they are the model's own distribution: `log_softmax` of the raw logits of
the step, before penalties, temperature, top-k/top-p and grammar masks. `SamplingParams.logprobs`
is the number of alternatives wanted (0: only the sampled token's log-probability; None: none).

Engine thread: `capture(logits, states)` before sampling (rows that asked only), then
`gather(capture, tokens)` after it gives, per sampled row, a `TokenLogprob` (one host sync for
all rows of the step). The HTTP layer formats them (`chat_logprobs`, `completion_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MAX_LOGPROBS", "TokenLogprob", "capture", "gather", "chat_logprobs", "completion_logprobs"]

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # most likely first


@dataclass
class Captured:
    rows: list[int]  # rows of the step's logits
    logprobs: torch.Tensor  # [len(rows), V] float32 log-softmax
    k: list[int]  # alternatives wanted per row


def capture(logits: torch.Tensor, states: list[Any]) -> Captured | None:
    rows = [i for i, st in enumerate(states) if st.params.logprobs is not None]
    if not rows:
        return None
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    lp = logits.index_select(0, idx).float().log_softmax(dim=-1)
    return Captured(rows, lp, [int(states[i].params.logprobs) for i in rows])


def gather(cap: Captured | None, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
    """Row -> its TokenLogprob. `tokens`: the step's sampled ids [n] (device)."""
    if cap is None:
        return {}
    idx = torch.tensor(cap.rows, dtype=torch.long, device=tokens.device)
    chosen = tokens.index_select(0, idx)
    chosen_lp = cap.logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    kmax = max(cap.k)
    top_v, top_i = (
        cap.logprobs.topk(kmax, dim=-1) if kmax else (cap.logprobs[:, :0], chosen.new_zeros(len(cap.rows), 0))
    )
    chosen_l, lp_l, tv, ti = chosen.tolist(), chosen_lp.tolist(), top_v.tolist(), top_i.tolist()
    out = {}
    for j, row in enumerate(cap.rows):
        k = cap.k[j]
        out[row] = TokenLogprob(chosen_l[j], lp_l[j], list(zip(ti[j][:k], tv[j][:k], strict=True)))
    return out


# ------------------------------------------------------------------ OpenAI formats


def _token_text(decode, token_id: int) -> str:
    return decode([token_id])


def chat_logprobs(items: list[TokenLogprob], decode, token_bytes: list[bytes] | None = None) -> dict[str, Any]:
    """`choices[].logprobs` of the chat API: {"content": [{token, logprob, bytes, top_logprobs}]}.
    `bytes` are the token's raw bytes when `token_bytes` (see `sampling.byte_level_token_bytes`)
    knows them: a token holding part of a UTF-8 character decodes to U+FFFD, its bytes do not."""

    def entry(tid: int, lp: float) -> dict[str, Any]:
        text = _token_text(decode, tid)
        raw = token_bytes[tid] if token_bytes is not None and 0 <= tid < len(token_bytes) else b""
        return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(raw or text.encode("utf-8"))}

    return {
        "content": [entry(t.token_id, t.logprob) | {"top_logprobs": [entry(i, v) for i, v in t.top]} for t in items]
    }


def completion_logprobs(items: list[TokenLogprob], decode, text_offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of the completions API: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = text_offset
    for t in items:
        text = _token_text(decode, t.token_id)
        tokens.append(text)
        lps.append(max(t.logprob, -9999.0))
        tops.append({_token_text(decode, i): max(v, -9999.0) for i, v in t.top})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
