"""Structured output (`response_format` json_object / json_schema) enforced with llguidance.

The request's format is compiled to an llguidance grammar in the HTTP layer (`compile_response_format`,
a bad schema is a 400). The engine makes one `GuidedDecoder` per request at admission (so a grammar
that fails with this tokenizer is a 400 too, never an error on the engine thread): before each step
the grammar's allowed-token bitmask sets every other logit to -inf (`guided_mask`, only for rows
that have a grammar), and after it the sampled token is consumed; when the grammar is complete the
request finishes with reason "stop". EOS is allowed exactly when the grammar accepts.

The llguidance tokenizer is built once per model, at its first guided request (about a second for a
150k vocabulary), from the Hugging Face fast tokenizer, with the width of the model's logits as its
vocabulary (padded rows stay masked).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

__all__ = ["GuidedDecoder", "ResponseFormatError", "compile_response_format", "guided_mask", "llg_tokenizer"]


class ResponseFormatError(ValueError):
    """The response_format cannot be enforced (bad schema); the message says why."""


def compile_response_format(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for an OpenAI `response_format`; None for text / absent."""
    import llguidance

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")  # type: ignore[union-attr]
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ResponseFormatError("response_format json_schema needs json_schema.schema (an object)")
    else:
        raise ResponseFormatError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
    try:
        # Compact JSON (no free whitespace between tokens): a model cannot pad the answer with
        # whitespace forever. A schema may override it with "x-guidance": {"whitespace_flexible": true}.
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except (ValueError, RuntimeError, TypeError) as exc:  # llguidance reports schema errors as these
        raise ResponseFormatError(f"response_format schema cannot be compiled: {exc}") from None
    is_error, errors = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ResponseFormatError(f"response_format schema cannot be enforced: {'; '.join(errors)[:500]}")
    return grammar


_tok_lock = threading.Lock()
_tok_cache: dict[int, Any] = {}


def llg_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """The llguidance tokenizer of `tokenizer` (cached per tokenizer object)."""
    import llguidance.hf

    with _tok_lock:
        key = id(tokenizer)
        if key not in _tok_cache:
            _tok_cache[key] = (
                tokenizer,
                llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids)[0]),
            )
        return _tok_cache[key][1]


class GuidedDecoder:
    """One request's grammar state."""

    __slots__ = ("matcher",)

    def __init__(self, lltok: Any, grammar: str) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ResponseFormatError(self.matcher.get_error())

    def consume(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete (or broken): the request should stop."""
        return self.matcher.is_stopped() or self.matcher.is_error()


def guided_mask(
    decoders: list[GuidedDecoder | None], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, allowed [k, V] bool) for the rows with a grammar; None when no row has one."""
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    rows = [i for i, d in enumerate(decoders) if d is not None]
    if not rows:
        return None
    bitmask = allocate_token_bitmask(len(rows), vocab_size)
    for j, i in enumerate(rows):
        fill_next_token_bitmask(decoders[i].matcher, bitmask, j)  # type: ignore[union-attr]
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(len(rows), -1)[:, :vocab_size].bool()
    return (torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True), allowed.to(device, non_blocking=True))
