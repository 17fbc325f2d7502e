"""Vision-language models (GLM-4.1V family: `Glm4vForConditionalGeneration`) in the engine.

Request side (`VisionLanguage.process`, called in a worker thread, never on the event loop):
the chat-templated text (one `<|image|>` placeholder per image) and the decoded images go through
the model's own image processor (`preprocessor_config.json`) into `pixel_values` and
`image_grid_thw`; each placeholder is expanded to `t*h*w / merge_size**2` image tokens (the rule
of `Glm4vProcessor`, which cannot be built without torchvision), and the multi-axis rotary
positions (M-RoPE) of the prompt come from the model's own `get_rope_index`. The result is a
`MultiModalInputs` carried by the scheduler's `Sequence.mm`.

Runner side (engine thread):
- The vision encoder runs for an image when a prefill chunk first holds some of its tokens, batched
  across the sequences of the step (`encode`). Images whose tokens all come from the prefix cache
  (kv_cache.py) are never encoded. Embeddings are also cached by image content hash
  (`EncoderCache`, LRU bounded in bytes), so a repeated image skips the encoder; a sequence keeps
  its images' embeddings until it finishes (a preempted sequence recomputes with them).
- `plan()` builds the step's 3-row position ids: prompt tokens take their M-RoPE position, computed
  for the whole prompt at request time (so a suffix after a reused prefix is exact); decode tokens
  and generated tokens recomputed after a preemption take `cache position + rope_delta` on all
  three axes (the sequence's offset, kept in `Sequence.mm`); text-only sequences have delta 0.
- `embed()` builds `inputs_embeds`: token embeddings, with the rows of image tokens replaced by
  image embeddings. A chunk boundary may fall anywhere inside an image's tokens: each chunk takes
  exactly the embedding rows of the image tokens it holds.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .multimodal import MediaError

__all__ = ["EncoderCache", "MultiModalInputs", "VisionLanguage", "is_vision_language"]

log = logging.getLogger(__name__)


def is_vision_language(config: Any) -> bool:
    """True for a GLM-4.1V-family config (the architectures this module serves)."""
    return getattr(config, "model_type", None) in ("glm4v",)


@dataclass(eq=False)
class MultiModalInputs:
    pixel_values: torch.Tensor  # [sum of patches, C * temporal_patch * patch * patch] (CPU)
    image_grid_thw: torch.Tensor  # [n_images, 3] long (CPU)
    image_hashes: list[str]
    positions: torch.Tensor  # [3, prompt_len] long: M-RoPE positions of the prompt (CPU)
    rope_delta: int  # decode position = cache position + rope_delta
    image_token_pos: torch.Tensor  # [n_image_tokens] prompt positions of image tokens, ascending
    tokens_per_image: list[int]
    patches_per_image: list[int]  # rows of pixel_values per image (0 for one taken from the encoder cache)
    cached_embeds: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    # per image: its embeddings [tokens, H] on the device once encoded (None before)
    image_embeds: list[torch.Tensor | None] = field(default_factory=list, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_hashes)

    @property
    def spans(self) -> list[tuple[int, int, str]]:
        """(first, end) prompt positions of each image's tokens (contiguous) and its content hash."""
        out, k = [], 0
        for n, h in zip(self.tokens_per_image, self.image_hashes, strict=True):
            first = int(self.image_token_pos[k]) if n else 0
            out.append((first, first + n, h))
            k += n
        return out

    def release(self) -> None:
        """Drops the embeddings and pixels (the sequence finished)."""
        self.image_embeds = [None] * self.num_images
        self.pixel_values = self.pixel_values[:0]
        self.cached_embeds = []


class EncoderCache:
    """Image embeddings (and their patch grid) by content hash, least recently used evicted beyond
    `max_bytes`. Thread-safe: request threads look up, the engine thread inserts."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # request images whose embeddings came from here
        self.misses = 0  # request images the vision encoder ran on

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeddings [n_tokens, H], grid_thw [3]) or None."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, embeds: torch.Tensor, grid: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = (embeds, grid)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


class VisionLanguage:
    """The vision half of a loaded `Glm4vForConditionalGeneration` and its image processor."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, encoder_cache_bytes: int = 256 << 20) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = int(getattr(image_processor, "merge_size", cfg.vision_config.spatial_merge_size))
        self.cache = EncoderCache(encoder_cache_bytes)
        self._embed_tokens = model.get_input_embeddings()

    # ------------------------------------------------------------------ request side (worker thread)
    def process(self, text: str, images: list[Any], hashes: list[str]) -> tuple[list[int], MultiModalInputs | None]:
        """Prompt token ids (image placeholders expanded) and the request's `MultiModalInputs`
        (None without images). `text` holds one `self.image_token` per image, in order."""
        if text.count(self.image_token) != len(images):  # e.g. a literal image token typed in the text
            raise MediaError(
                f"the prompt has {text.count(self.image_token)} image placeholders "
                f"({self.image_token!r}) for {len(images)} images"
            )
        if not images:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None
        # Images already in the encoder cache skip the image processor too: their embeddings are
        # taken now (held by this request, so a later eviction does not matter) with their grid.
        cached = [self.cache.get(h) for h in hashes]
        todo = [im for im, c in zip(images, cached, strict=True) if c is None]
        feats = self.image_processor(images=todo, return_tensors="pt") if todo else None
        grids, fresh = [], iter(feats["image_grid_thw"].long() if feats is not None else [])
        for c in cached:
            grids.append(c[1] if c is not None else next(fresh))
        grid = torch.stack(grids)
        counts = [int(g.prod()) // self.merge_size**2 for g in grid]
        parts = text.split(self.image_token)
        expanded = parts[0] + "".join(self.image_token * n + p for n, p in zip(counts, parts[1:], strict=True))
        ids = list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        ids_t = torch.tensor([ids], dtype=torch.long)
        is_image = ids_t[0] == self.image_token_id
        if int(is_image.sum()) != sum(counts):
            raise MediaError("the image tokens of the prompt do not match its images")
        with torch.inference_mode():
            positions, deltas = self.model.model.get_rope_index(
                ids_t, mm_token_type_ids=is_image.long().unsqueeze(0), image_grid_thw=grid
            )
        mm = MultiModalInputs(
            pixel_values=feats["pixel_values"] if feats is not None else torch.zeros(0),
            image_grid_thw=grid,
            cached_embeds=[c[0] if c is not None else None for c in cached],
            image_hashes=list(hashes),
            positions=positions[:, 0].clone(),
            rope_delta=int(deltas.reshape(-1)[0]),
            image_token_pos=torch.nonzero(is_image).reshape(-1),
            tokens_per_image=counts,
            patches_per_image=[int(g.prod()) if c is None else 0 for g, c in zip(grid, cached, strict=True)],
            image_embeds=[None] * len(counts),
        )
        return ids, mm

    # ------------------------------------------------------------------ runner side (engine thread)
    @torch.inference_mode()
    def encode(self, need: list[tuple[MultiModalInputs, int]], device: torch.device, dtype: torch.dtype) -> None:
        """Fill ``mm.image_embeds[i]`` for each ``(mm, i)`` of ``need``: from the embeddings the request
        took at preprocessing or the encoder cache, the rest through the vision encoder in one call."""
        todo: list[tuple[MultiModalInputs, int]] = []
        for mm, i in need:
            if mm.image_embeds[i] is not None:
                continue
            held = mm.cached_embeds[i] if mm.cached_embeds else None
            if held is None:  # not cached at preprocessing: encoded meanwhile for another request?
                entry = self.cache.get(mm.image_hashes[i])
                held = entry[0] if entry is not None else None
            if held is None:
                todo.append((mm, i))
                self.cache.misses += 1
            else:
                self.cache.hits += 1
                mm.image_embeds[i] = held.to(device)
        if todo:
            pixels, grids = [], []
            for mm, i in todo:
                start = sum(mm.patches_per_image[:i])
                pixels.append(mm.pixel_values[start : start + mm.patches_per_image[i]])
                grids.append(mm.image_grid_thw[i])
            out = self.model.model.get_image_features(
                torch.cat(pixels).to(device=device, dtype=self.model.model.visual.dtype),
                torch.stack(grids).to(device),
                return_dict=True,
            )
            for (mm, i), emb in zip(todo, out.pooler_output, strict=True):
                emb = emb.to(dtype)
                mm.image_embeds[i] = emb
                self.cache.put(mm.image_hashes[i], emb, mm.image_grid_thw[i])
        for mm, _ in need:
            if all(e is not None for e in mm.image_embeds):  # the pixels are not needed any more
                mm.pixel_values = mm.pixel_values[:0]
                mm.cached_embeds = []

    def plan(self, out: Any, device: torch.device) -> VisionStep:
        """Positions and image rows of one scheduler step (on the engine thread, between steps)."""
        n_dec = len(out.decodes)
        pos_parts: list[torch.Tensor] = []
        if n_dec:
            p = torch.tensor(
                [s.num_computed_tokens + (s.mm.rope_delta if s.mm is not None else 0) for s in out.decodes],
                dtype=torch.long,
            )
            pos_parts.append(p.unsqueeze(0).expand(3, -1))
        off = n_dec
        fills: list[tuple[torch.Tensor, MultiModalInputs, int, torch.Tensor]] = []
        need: list[tuple[MultiModalInputs, int]] = []
        for ch in out.prefills:
            mm = ch.seq.mm
            s, e = ch.start, ch.start + ch.num_tokens
            if mm is None:
                pos_parts.append(torch.arange(s, e).unsqueeze(0).expand(3, -1))
            else:
                plen = mm.positions.shape[1]
                if s < plen:
                    pos_parts.append(mm.positions[:, s : min(e, plen)])
                if e > plen:  # generated tokens recomputed after a preemption
                    pos_parts.append((torch.arange(max(s, plen), e) + mm.rope_delta).unsqueeze(0).expand(3, -1))
                for i, (a, b, _) in enumerate(mm.spans):
                    lo, hi = max(a, s), min(b, e)
                    if hi > lo:
                        if mm.image_embeds[i] is None:
                            need.append((mm, i))
                        fills.append((torch.arange(lo - s + off, hi - s + off), mm, i, torch.arange(lo - a, hi - a)))
            off += ch.num_tokens
        positions = torch.cat(pos_parts, dim=1) if pos_parts else torch.zeros(3, 0, dtype=torch.long)
        return VisionStep(positions=positions.to(device, non_blocking=True).unsqueeze(1), fills=fills, need=need)

    def embed(
        self, input_ids: torch.Tensor, vstep: VisionStep, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """`inputs_embeds` [1, T, H] of the step; runs the encoder for the images that need it."""
        if vstep.need:
            self.encode(vstep.need, device, dtype)
        emb = self._embed_tokens(input_ids)
        for rows, mm, i, erows in vstep.fills:
            embeds = mm.image_embeds[i]
            assert embeds is not None
            emb[0, rows.to(device)] = embeds[erows.to(device)].to(emb.dtype)
        return emb


@dataclass
class VisionStep:
    positions: torch.Tensor  # [3, 1, T]
    fills: list  # (rows in the packed batch, mm, image index, rows of the image's embeddings)
    need: list[tuple[MultiModalInputs, int]]  # images to encode this step


class VisionMetrics:
    """Prometheus collector (read at scrape time) of the engine's current vision model:
    `autoglm_encoder_cache_hits_total` (request images whose embeddings came from the encoder cache)
    and `autoglm_encoder_cache_misses_total` (request images the vision encoder ran on). Nothing is
    exported for a text-only model."""

    def __init__(self, engine: Any, labels: Any) -> None:
        self.engine = engine
        self.labels = labels  # () -> (model, revision)

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        vl = self.engine.vision
        if vl is None:
            return
        lv = list(self.labels())
        for name, doc, value in (
            (
                "autoglm_encoder_cache_hits",
                "Request images whose embeddings came from the encoder cache.",
                vl.cache.hits,
            ),
            ("autoglm_encoder_cache_misses", "Request images the vision encoder ran on.", vl.cache.misses),
        ):
            fam = CounterMetricFamily(name, doc, labels=["model", "revision"])
            fam.add_metric(lv, value)
            yield fam
