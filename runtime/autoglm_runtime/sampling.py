"""Sampling parameters and batched sampling where every row has its own parameters.

`sample(logits, rows)` takes the last-position logits of one engine step ([n, vocab], any dtype,
on the model's device) and returns an int64 tensor [n] of token ids *on the device*; the engine
does the single host sync of the step (`.tolist()`). Greedy rows (temperature == 0) are argmax.
Other rows: temperature, then top-k, then top-p, then a draw. A row with a `seed` draws from its
own `torch.Generator`, so its output does not depend on what else is in the batch.

`min_tokens` (vLLM's extension): until a request has generated `min_tokens` tokens, its EOS ids
(unless `ignore_eos`) and `stop_token_ids` get logit -inf and its stop strings are not matched.
The runner passes the (row, token id) pairs to suppress as `sample(..., suppress=...)`, built
only in steps where some row still needs them, so other steps pay nothing.

Stop strings are not handled here: they are matched on detokenized text by the engine
(`IncrementalDetokenizer`), and the text returned never includes the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .penalties import PenaltyBatch, PenaltyState, apply_penalties

if TYPE_CHECKING:
    from .guided import GuidedDecoder

__all__ = [
    "SamplingParams",
    "SamplingState",
    "sample",
    "min_tokens_suppression",
    "IncrementalDetokenizer",
    "byte_level_token_bytes",
]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS / stop_token_ids / stop strings are suppressed until this many tokens
    presence_penalty: float = 0.0  # OpenAI: over generated tokens (see penalties.py)
    frequency_penalty: float = 0.0  # OpenAI: over generated tokens
    repetition_penalty: float = 1.0  # vLLM / HF: over prompt and generated tokens
    logprobs: int | None = None  # alternatives per token to report (0: only the sampled one); see logprobs.py
    grammar: str | None = None  # llguidance grammar the output must follow (response_format); see guided.py

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.max_tokens is None or self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.min_tokens is None or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}]")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError("repetition_penalty must be > 0 and finite")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


class SamplingState:
    """Per-request sampling state: its params and (when seeded) its own generator."""

    __slots__ = ("params", "generator", "penalty", "guide")

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.penalty: PenaltyState | None = None  # made by the runner at the first sampled step
        self.guide: GuidedDecoder | None = None  # made by the engine at admission when params.grammar is set
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(params.seed))


def min_tokens_suppression(
    states: list[SamplingState],
    num_output_tokens: list[int],
    eos_token_ids: list[frozenset[int] | set[int]],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) whose logits `sample` must set to -inf: for every row that has generated fewer
    than its `min_tokens`, its stop token ids and (unless `ignore_eos`) its EOS ids. None when no row
    needs any. Row i is `states[i]`, with `num_output_tokens[i]` tokens so far."""
    rows: list[int] = []
    cols: list[int] = []
    for i, st in enumerate(states):
        p = st.params
        if num_output_tokens[i] >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:
            banned.update(eos_token_ids[i])
        banned = {t for t in banned if 0 <= t < vocab_size}
        rows.extend([i] * len(banned))
        cols.extend(sorted(banned))
    if not rows:
        return None
    return (
        torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True),
        torch.tensor(cols, dtype=torch.long).to(device, non_blocking=True),
    )


def sample(
    logits: torch.Tensor,
    states: list[SamplingState],
    generator: torch.Generator | None = None,
    suppress: tuple[torch.Tensor, torch.Tensor] | None = None,
    penalties: PenaltyBatch | None = None,
    guided: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One token per row of `logits` ([n, V]); `states[i]` holds row i's params. `penalties` are
    applied first (see penalties.py), then `guided` (rows, allowed [k, V]), then `suppress`:
    (rows, token ids) set to -inf (see `min_tokens_suppression`); `logits` is modified."""
    if penalties is not None:
        apply_penalties(logits, penalties)
    if guided is not None:  # (rows, allowed [k, V]): tokens the grammar forbids get -inf
        g_rows, allowed = guided
        g_sub = logits.index_select(0, g_rows).masked_fill(~allowed[:, : logits.shape[1]], float("-inf"))
        logits.index_copy_(0, g_rows, g_sub)
    if suppress is not None:
        logits.index_put_(suppress, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    if all(s.params.greedy for s in states):
        return logits.argmax(dim=-1)
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    device = logits.device
    idx = torch.tensor(rows, device=device)
    sub = logits.index_select(0, idx)
    temps = torch.tensor([states[i].params.temperature for i in rows], device=device, dtype=torch.float32)
    sub = sub / temps.unsqueeze(1)

    top_ks = [states[i].params.top_k for i in rows]
    top_ps = [states[i].params.top_p for i in rows]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
        vocab = sub.shape[-1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=device)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        remove = ranks >= ks.unsqueeze(1)
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        ps = torch.tensor(top_ps, device=device, dtype=torch.float32).unsqueeze(1)
        remove = remove | ((cum - probs) >= ps)  # keep the smallest prefix whose mass reaches top_p
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter(1, sorted_idx, sorted_logits)

    probs = sub.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p; seeded rows draw their
    # noise from their own generator so their tokens do not depend on the batch.
    noise = torch.empty_like(probs)
    unseeded = [j for j, i in enumerate(rows) if states[i].generator is None]
    if unseeded:
        if len(unseeded) == len(rows):
            noise.exponential_(generator=generator)
        else:
            for j in unseeded:
                noise[j].exponential_(generator=generator)
    for j, i in enumerate(rows):
        gen = states[i].generator
        if gen is not None:
            noise[j].exponential_(generator=gen)
    drawn = (probs / noise).argmax(dim=-1)
    return greedy_tokens.index_copy(0, idx, drawn)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, and matches stop strings.

    The text comes from `tokenizers.decoders.DecodeStream`, which never emits half a multi-byte
    character; at the end, whatever it still holds back (e.g. an incomplete UTF-8 sequence) is taken
    from one full decode, so the deltas always add up to `tokenizer.decode(ids)`. When stop strings
    are set, the last `len(longest)-1` characters are held back until it is known they do not
    start a stop string.
    """

    __slots__ = ("_tokenizer", "_stream", "_decoded", "_read_offset", "stop", "_hold", "text", "_emitted", "stopped")

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self._tokenizer = tokenizer  # a `tokenizers.Tokenizer` (a fast tokenizer's backend_tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._decoded = 0  # characters DecodeStream has produced
        self._read_offset = 0
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def _new_text(self, token_ids: list[int], final: bool) -> str:
        pieces = []
        for i in token_ids[self._read_offset :]:
            piece = self._stream.step(self._tokenizer, i)
            if piece:
                pieces.append(piece)
        self._read_offset = len(token_ids)
        new = "".join(pieces)
        self._decoded += len(new)
        if final:
            rest = self._tokenizer.decode(token_ids, skip_special_tokens=True)[self._decoded :]
            self._decoded += len(rest)
            new += rest
        return new

    def step(self, token_ids: list[int], final: bool, check_stop: bool = True) -> str:
        """`token_ids` is the full output so far. Returns the new text to emit; sets `stopped`
        when a stop string matched (the text is cut before it). With `check_stop=False` (before
        `min_tokens`) the new text is not searched; later steps search only their own new text and
        the `len(longest stop) - 1` characters before it, as vLLM does."""
        if not self.stopped:
            new = self._new_text(token_ids, final)
            if new:
                start = max(0, len(self.text) - self._hold)
                self.text += new
                if self.stop and check_stop:
                    cut = -1
                    for s in self.stop:
                        i = self.text.find(s, start)
                        if i != -1 and (cut == -1 or i < cut):
                            cut = i
                    if cut != -1:
                        self.text = self.text[:cut]
                        self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by byte-level BPE tokenizers."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_level_token_bytes(tokenizer) -> list[bytes] | None:
    """The raw bytes of every token id of a byte-level BPE tokenizer (b"" for special tokens, which
    are skipped), checked against the tokenizer's own decode of every id; None when the tokenizer
    is not plain byte-level or any id disagrees (the caller then decodes through the tokenizer).
    Used for the `bytes` of chat logprobs (see logprobs.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    try:
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
        size = backend.get_vocab_size(with_added_tokens=True)
        table: list[bytes] = []
        for i in range(size):
            if i in special or (i in added and added[i].special):
                table.append(b"")
                continue
            tok = backend.id_to_token(i)
            if tok is None or any(c not in char_to_byte for c in tok):
                return None
            raw = bytes(char_to_byte[c] for c in tok)
            if raw.decode("utf-8", "replace") != backend.decode([i], skip_special_tokens=True):
                return None
            table.append(raw)
        return table
    except Exception:  # noqa: BLE001 - any surprise: fall back to decoding through the tokenizer
        return None
