"""Runs one engine step on a Hugging Face causal LM with an engine-managed slot KV cache.

Design (measured on CPU; the same code runs on CUDA):

* KV cache: a *paged* pool (see kv_cache.py for the bookkeeping): per layer, K and V tensors
  `[num_blocks * block_size, kv_heads, head_dim]`, preallocated once and zeroed (block 0 is the null
  block, never handed out). Token `p` of a sequence lives in slot
  `block_ids[p // block_size] * block_size + p % block_size`.
* One forward per step over a *packed* batch `[1, T]`: the decode token of every running sequence
  followed by the prefill chunks of this step. No padding, so the linear layers (the bulk of the
  compute) run on exactly T rows. Explicit `position_ids` drive the model's own rotary embedding;
  `logits_to_keep` limits the LM head to the rows we sample from.
* Attention: the model's own layers call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`;
  we register `autoglm_paged` there. It writes the step's new K/V into the pool by slot mapping
  (`index_copy_`) and runs SDPA: all decode rows in one call against K/V gathered by index from
  their block tables (`[n, kv_heads, L, head_dim]`, positions past a sequence's length read the
  null block and are masked; grouped-query heads folded into the query axis, so no K/V repeat),
  and each prefill chunk causally (a chunk at position 0: on its fresh K/V with `is_causal`; a
  later chunk or one after a prefix-cache hit: against its gathered prefix). Called outside an
  engine step (e.g. `model.generate`), the function falls back to the stock sdpa implementation,
  so the model object stays usable.
* Sampling happens on device; the engine does the one host sync of the step (`.tolist()`).

Works for any model whose attention goes through the attention interface (GLM, Llama, Qwen2,
Mistral, ...). Not supported: sliding-window layers, attention sinks, soft-capping, encoder-decoder.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .guided import guided_mask
from .loader import LoadedModel, ModelLoadError
from .logprobs import TokenLogprob, capture, gather
from .memory import cpu_available_memory, kv_bytes_per_token
from .penalties import PenaltyBatch, penalty_batch_for
from .sampling import SamplingState, min_tokens_suppression, sample
from .scheduler import SchedulerOutput
from .vision import VisionLanguage, VisionStep

__all__ = ["ModelRunner", "ATTN_IMPL", "KVCacheTooLargeError"]


class KVCacheTooLargeError(ModelLoadError, ValueError):
    """The KV cache asked for does not fit in the memory available, or holds less than one sequence."""


ATTN_IMPL = "autoglm_paged"
_ctx = threading.local()  # .step: the _Step running on this thread (None outside a step)


@dataclass
class _Step:
    runner: ModelRunner
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    w_slots: torch.Tensor  # [T] pool slot of each token
    n_dec: int
    dec_idx: torch.Tensor | None  # [n_dec, L] pool slot of each position attended by each decode row
    dec_mask: torch.Tensor | None  # [n_dec, 1, 1, L] additive
    chunks: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]]  # (offset, length, start, idx, mask)
    keep: torch.Tensor  # rows whose logits are sampled
    states: list[SamplingState]
    suppress: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) -> -inf (min_tokens)
    penalties: PenaltyBatch | None = None  # repetition / frequency / presence penalties
    vision: VisionStep | None = None  # vision-language models: M-RoPE positions and image rows
    logprobs: dict[int, TokenLogprob] | None = None  # set by execute(): sampled row -> its logprobs
    guided: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, allowed tokens): response_format grammars


def _paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    step: _Step | None = getattr(_ctx, "step", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return step.runner.attend(step, module.layer_idx, query, key, value, scaling)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _paged_attention)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or on CPU the smaller of the host's
    available memory and the container's cgroup room (``memory.py``). None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        return cpu_available_memory()
    except (OSError, RuntimeError):  # unknown: do not block
        return None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token_for(cfg, itemsize: int) -> int:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return kv_bytes_per_token(cfg.num_hidden_layers, kv_heads, head_dim, itemsize)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, seed: int | None = None) -> None:
        _register()
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        cfg = text_config(loaded.config)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.groups = self.num_heads // self.kv_heads
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ModelLoadError(f"unsupported model: layer types {sorted(set(layer_types))} (only full attention)")
        attn_layers = [
            m for m in self.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
        ]
        if len(attn_layers) != self.num_layers:
            raise ModelLoadError(
                f"unsupported model: found {len(attn_layers)} attention modules for {self.num_layers} layers"
            )
        # Zeroed, not torch.empty: positions never written are never read (past a sequence's length the
        # gather reads the null block), but on CPU an uninitialised pool measured 6x slower end to end
        # (cause not pinned down; flush-to-zero denormals made it fast too), and zeroing
        # commits the memory up front, as the slot cache did.
        shape = (num_blocks * block_size, self.kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        head = self.model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0] if head is not None else cfg.vocab_size  # logits' width
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self._set_attn_impl()
        # Vision-language models (see vision.py): images enter as embeddings at prefill.
        self.vl = (
            VisionLanguage(self.model, loaded.tokenizer, loaded.image_processor) if loaded.is_vision_language else None
        )

    def _set_attn_impl(self) -> None:
        try:
            self.model.set_attn_implementation(ATTN_IMPL)
        except Exception:  # noqa: BLE001 - older/odd models: set the config field directly
            for c in {
                id(self.model.config): self.model.config,
                **{id(m.config): m.config for m in self.model.modules() if hasattr(m, "config")},
            }.values():
                c._attn_implementation = ATTN_IMPL
        if self.model.config._attn_implementation != ATTN_IMPL:
            raise ModelLoadError(f"unsupported model: cannot route its attention through {ATTN_IMPL}")

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # ------------------------------------------------------------------ per step
    def _index(self, tables: list[list[int]], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots of positions [0, max(lens)) of each block table (the null block past each length)
        and the validity mask, both on the device."""
        bs, dev = self.block_size, self.device
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).to(dev, non_blocking=True)
        length = max(lens)
        ar = torch.arange(length, device=dev)
        idx = bt[:, ar // bs] * bs + ar % bs
        valid = ar.unsqueeze(0) < torch.tensor(lens, dtype=torch.long).to(dev, non_blocking=True).unsqueeze(1)
        return idx.masked_fill_(~valid, 0), valid

    def prepare(self, out: SchedulerOutput, states: list[SamplingState]) -> _Step:
        """Build the step's tensors from scheduler state (on the engine thread, between steps)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_lens: list[int] = []
        dec_tables: list[list[int]] = []
        for seq in out.decodes:
            p = seq.num_computed_tokens
            ids.append(seq.last_token_id)
            pos.append(p)
            slots.append(seq.block_ids[p // bs] * bs + p % bs)
            dec_tables.append(seq.block_ids)
            dec_lens.append(p + 1)
        n_dec = len(ids)
        keep = list(range(n_dec))
        chunk_specs: list[tuple[int, int, int, list[int]]] = []
        for ch in out.prefills:
            off = len(ids)
            seq = ch.seq
            end = ch.start + ch.num_tokens
            ids.extend(seq.token_ids(ch.start, end))
            pos.extend(range(ch.start, end))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(ch.start, end))
            chunk_specs.append((off, ch.num_tokens, ch.start, table))
            if ch.samples:
                keep.append(off + ch.num_tokens - 1)
        suppress = None
        if any(st.params.min_tokens for st in states):  # only then: the common step pays one scan
            seqs = out.sampled_sequences
            suppress = min_tokens_suppression(
                states,
                [len(s.output_token_ids) for s in seqs],
                [s.eos_token_ids for s in seqs],
                self.vocab_size,
                self.device,
            )
        guided = None
        if any(st.guide is not None for st in states):  # likewise (decoders are made at admission)
            guided = guided_mask([st.guide for st in states], self.vocab_size, self.device)
        penalties = None
        if any(st.params.has_penalties for st in states):  # likewise: one scan when none has any
            penalties = penalty_batch_for(out.sampled_sequences, states, self.vocab_size, self.device)

        dev = self.device
        pos_t = torch.tensor(pos, dtype=torch.long)
        dec_idx = dec_mask = None
        if n_dec:
            dec_idx, valid = self._index(dec_tables, dec_lens)
            dec_mask = torch.zeros(valid.shape, dtype=self.dtype, device=dev).masked_fill_(~valid, float("-inf"))
            dec_mask = dec_mask.view(n_dec, 1, 1, -1)
        chunks = []
        for off, n, start, table in chunk_specs:
            idx = mask = None
            if start > 0:
                idx = self._index([table], [start + n])[0][0]
                q_pos = torch.arange(start, start + n).unsqueeze(1)
                mask = (torch.arange(start + n).unsqueeze(0) <= q_pos).to(dev, non_blocking=True)
            chunks.append((off, n, start, idx, mask))
        return _Step(
            runner=self,
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True).unsqueeze(0),
            position_ids=pos_t.to(dev, non_blocking=True).unsqueeze(0),
            w_slots=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            n_dec=n_dec,
            dec_idx=dec_idx,
            dec_mask=dec_mask,
            chunks=chunks,
            keep=torch.tensor(keep, dtype=torch.long).to(dev, non_blocking=True),
            states=states,
            suppress=suppress,
            penalties=penalties,
            guided=guided,
            vision=self.vl.plan(out, dev) if self.vl is not None else None,
        )

    @torch.inference_mode()
    def execute(self, step: _Step) -> torch.Tensor:
        """Forward + sample. Returns the sampled token ids [n] on the device (no host sync)."""
        if step.vision is not None:  # the vision encoder (if needed) runs here, outside the step context
            inputs = dict(
                inputs_embeds=self.vl.embed(step.input_ids, step.vision, self.device, self.dtype),  # type: ignore[union-attr]
                position_ids=step.vision.positions,
            )
        else:
            inputs = dict(input_ids=step.input_ids, position_ids=step.position_ids)
        _ctx.step = step
        try:
            out = self.model(**inputs, use_cache=False, logits_to_keep=step.keep)
        finally:
            _ctx.step = None
        logits = out.logits[0]
        captured = capture(logits, step.states)  # the raw distribution, before penalties and sampling
        tokens = sample(logits, step.states, self.generator, step.suppress, step.penalties, step.guided)
        if captured is not None:
            step.logprobs = gather(captured, tokens)
        return tokens

    # ------------------------------------------------------------------ attention
    def attend(self, step: _Step, layer: int, query, key, value, scaling) -> tuple[torch.Tensor, None]:
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc.index_copy_(0, step.w_slots, key[0].transpose(0, 1))  # [T, KV, D]
        vc.index_copy_(0, step.w_slots, value[0].transpose(0, 1))

        q = query[0]  # [H, T, D]
        H, T, D = q.shape
        KV, G = self.kv_heads, self.groups
        out = q.new_empty(T, H, D)
        n = step.n_dec
        if n:
            assert step.dec_idx is not None
            qd = q[:, :n].transpose(0, 1).reshape(n, KV, G, D)
            length = step.dec_idx.shape[1]
            flat = step.dec_idx.reshape(-1)
            kk = kc.index_select(0, flat).view(n, length, KV, D).transpose(1, 2)
            vv = vc.index_select(0, flat).view(n, length, KV, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=step.dec_mask, scale=scaling)
            out[:n] = o.reshape(n, H, D)
        for off, c, _start, idx, mask in step.chunks:
            qc = q[:, off : off + c].unsqueeze(0)  # [1, H, c, D]
            if idx is None:
                kk = key[:, :, off : off + c]
                vv = value[:, :, off : off + c]
                o = F.scaled_dot_product_attention(qc, kk, vv, is_causal=True, scale=scaling, enable_gqa=G > 1)
            else:
                kk = kc.index_select(0, idx).transpose(0, 1).unsqueeze(0)
                vv = vc.index_select(0, idx).transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=mask, scale=scaling, enable_gqa=G > 1)
            out[off : off + c] = o[0].transpose(0, 1)
        return out.unsqueeze(0), None
