"""The inference engine the HTTP layer talks to (the shape of vLLM's AsyncLLM).

API (all coroutine methods must be called on one asyncio event loop, the server's):

    engine = Engine(load_model(dir), max_batch_size=32, max_queue=256, max_batch_tokens=2048,
                    max_model_len=None, revision="", on_step=None, num_threads=None, seed=None,
                    kv_cache_memory=None, block_size=16, enable_prefix_caching=True)
    # max_model_len: None = min(model's max_position_embeddings, 8192). The KV cache is a pool of
    # blocks of block_size positions (paged, see kv_cache.py): kv_cache_memory bytes, or by default
    # room for max_batch_size x max_model_len positions capped at a fraction of the free memory
    # (memory.KV_MEMORY_FRACTION; the cgroup's room on CPU). KVCacheTooLargeError (a ValueError and a
    # ModelLoadError) when that does not fit or holds less than one max_model_len sequence.
    # enable_prefix_caching: reuse the KV of prompt prefixes seen before (images hashed by content).
    # num_threads: torch intra-op threads (CPU).
    await engine.start()

    stream = await engine.add_request(request_id, prompt, params, priority=0, mm=None, cache_salt=None)
    # mm: the prompt's images (`vision.MultiModalInputs`, from `engine.vision.process`) for a
    # vision-language model; InvalidRequestError when the model takes none.
    # returns once the request is ADMITTED (in the engine's queue), before any token; raises
    # the errors below. cache_salt: prefixes are shared only between requests with the same salt.
    # `async for out in stream`, then `await stream.aclose()` (aborts it if
    # unfinished and returns once its slot is free). This is `engine_api.EngineClient`, which the
    # server uses. `generate()` wraps it for tests and scripts:
    async for out in engine.generate(request_id, prompt, params, priority=0):
        # prompt: list[int] token ids, or a str (tokenized as `tokenizer.encode(prompt)` with the
        #         tokenizer of the model that will serve it, which matters only around reload())
        # out: RequestOutput(request_id, new_token_ids, new_text, finished, finish_reason,
        #                    prompt_tokens, completion_tokens, arrival_time, first_scheduled_time,
        #                    first_token_time, finish_time, logprobs, num_cached_tokens)
        # times: time.monotonic(); num_cached_tokens: prompt tokens whose KV came from the prefix cache
        # logprobs: a logprobs.TokenLogprob per new token when params.logprobs is set, else None
        ...
    # Raised by add_request (generate: at the first `__anext__()`), before any output; all are
    # `engine_api.EngineError`s, mapped to HTTP codes in `server/errors.from_engine`:
    #   QueueFullError      the waiting queue holds max_queue requests        -> 429
    #   InvalidRequestError empty/too-long prompt, unknown ids, duplicate id,  -> 400
    #                       images for a text-only model, a response_format
    #                       grammar that cannot be enforced with this tokenizer
    #   EngineDrainingError drain()/stop() was called                         -> 503
    #   EngineDeadError     the step loop died (also raised mid-stream)       -> 503
    # Leaving the loop early (break, client disconnect -> CancelledError/GeneratorExit) aborts the
    # request and frees its slot; wrap in `contextlib.aclosing()` so that happens immediately.

    engine.abort(request_id)          # finishes it with finish_reason "abort"; unknown ids ignored
    engine.check_health() -> bool     # False once the step loop has died (or before start/after stop)
    engine.stats() -> EngineStats     # num_running, num_waiting, kv_cache_usage, KV blocks, prefix
                                      # cache queries/hits (tokens), preemptions, ...
    await engine.reload(model_dir, revision="")  # load in a thread, then new requests go to the new
                                      # model; requests already admitted finish on the old one, which
                                      # is freed when it has drained. Raises ModelLoadError (old model
                                      # keeps serving); InsufficientMemoryError first when the new
                                      # weights + KV cache do not fit next to the serving model
                                      # (cgroup-aware, see memory.py).
    await engine.drain(timeout) -> bool   # stop admitting; wait until in-flight requests finish
    await engine.stop()               # stop the loop; unfinished requests end with "abort"
    engine.tokenizer, engine.model_dir, engine.model_name, engine.revision, engine.max_model_len,
    engine.eos_token_ids, engine.device, engine.dtype,
    engine.vision                     # vision.VisionLanguage of a vision-language model, else None

Metrics hook (no prometheus import here): `on_step(StepStats)` is called on the engine thread after
every step (keep it fast and thread-safe; prometheus_client metrics are). Per-request timings come
with every RequestOutput.

Layout: this module is the facade and the models' lifecycle (start, drain, stop, reload, stats);
`engine_admission.py` takes requests in (checks, tokenizing, cancellation), `engine_loop.py` is the
step loop on its own thread (torch releases the GIL inside kernels; the event loop never takes a lock
it holds), `engine_output.py` turns sampled tokens into each request's stream (detokenizing with
`tokenizers.decoders.DecodeStream`, stop strings, logprobs), `scheduler.py` + `kv_cache.py` decide
what runs and where its KV lives, `model_runner.py` runs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from .engine_admission import Admission
from .engine_api import (
    EngineDeadError,
    EngineDrainingError,
    EngineStats,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
)
from .engine_loop import ModelInstance, StepLoop, StepStats
from .engine_output import Outbox, RequestStream
from .loader import InsufficientMemoryError, LoadedModel, ModelLoadError, load_model, resolve_device, resolve_dtype
from .memory import KV_MEMORY_FRACTION, checkpoint_bytes, kv_cache_blocks
from .model_runner import KVCacheTooLargeError, ModelRunner, available_memory, kv_bytes_per_token_for, text_config
from .sampling import SamplingParams
from .scheduler import Scheduler
from .vision import MultiModalInputs, VisionLanguage

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineDrainingError",
    "EngineStats",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "ModelLoadError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "StepStats",
]

log = logging.getLogger(__name__)

# Every slot holds max_model_len positions, so without an explicit max_model_len the engine caps
# it here instead of sizing the cache for a 128k-context config.
DEFAULT_MAX_MODEL_LEN = 8192
# Share of the available memory a reload may plan to use (weights + KV cache of the new model).
RELOAD_MEMORY_FRACTION = 0.9


class Engine:
    """See the module docstring. Composes the admission (event loop), the step loop (its thread) and the
    outbox between them; owns the settings models are made with and the lifecycle."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_batch_tokens: int = 2048,
        max_model_len: int | None = None,
        revision: str = "",
        on_step: Callable[[StepStats], None] | None = None,
        num_threads: int | None = None,
        seed: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.kv_cache_memory = kv_cache_memory
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_queue = max_queue
        self.max_batch_tokens = max(max_batch_tokens, max_batch_size)
        self._max_model_len_arg = max_model_len
        self._seed = seed
        if num_threads and loaded.device.type == "cpu":
            torch.set_num_threads(num_threads)
        first = self._make_instance(loaded, revision)
        self._outbox = Outbox()
        self._steps = StepLoop(first, {}, self._outbox, on_step)
        self._admission = Admission(self._steps, first)
        self._reload_lock: asyncio.Lock | None = None

    def _max_len_for(self, loaded: LoadedModel) -> int:
        return min(loaded.max_model_len, self._max_model_len_arg or DEFAULT_MAX_MODEL_LEN)

    def _num_blocks(self, config: Any, max_len: int, itemsize: int, device: torch.device, capped: bool = True) -> int:
        """Blocks of the KV pool for a model (see the module docstring); ``capped=False``: what it would take
        without the cap by the free memory. Raises KVCacheTooLargeError."""
        try:
            return kv_cache_blocks(
                bytes_per_token=kv_bytes_per_token_for(text_config(config), itemsize),
                block_size=self.block_size,
                available=available_memory(device) if capped else None,
                kv_cache_memory=self.kv_cache_memory,
                default_tokens=self.max_batch_size * max_len,
                min_tokens=max_len,
                fraction=KV_MEMORY_FRACTION.get(device.type, 0.5),
            )
        except ValueError as exc:
            raise KVCacheTooLargeError(str(exc)) from None

    def _make_instance(self, loaded: LoadedModel, revision: str) -> ModelInstance:
        max_len = self._max_len_for(loaded)
        num_blocks = self._num_blocks(loaded.config, max_len, loaded.dtype.itemsize, loaded.device)
        runner = ModelRunner(loaded, num_blocks, self.block_size, seed=self._seed)
        scheduler = Scheduler(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_batch_tokens=self.max_batch_tokens,
            max_model_len=max_len,
            num_blocks=num_blocks,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
        )
        return ModelInstance(loaded, runner, scheduler, revision)

    # ------------------------------------------------------------------ properties
    @property
    def _serving(self) -> ModelInstance:
        """The model new requests go to."""
        return self._admission.serving

    @property
    def tokenizer(self):
        return self._serving.loaded.tokenizer

    @property
    def model_dir(self) -> Path:
        return self._serving.loaded.model_dir

    @property
    def model_name(self) -> str:
        return self._serving.loaded.model_dir.name

    @property
    def revision(self) -> str:
        return self._serving.revision

    @property
    def max_model_len(self) -> int:
        return self._serving.scheduler.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self._serving.eos_token_ids)

    @property
    def vision(self) -> VisionLanguage | None:
        """The current model's vision half (None for text-only models); see vision.py."""
        return self._serving.runner.vl

    @property
    def device(self) -> torch.device:
        return self._serving.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self._serving.loaded.dtype

    @property
    def num_steps(self) -> int:
        return self._steps.num_steps

    @property
    def prompt_tokens_total(self) -> int:
        return self._steps.prompt_tokens_total

    @property
    def generation_tokens_total(self) -> int:
        return self._steps.generation_tokens_total

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._steps.thread is not None:
            return
        self._outbox.loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        self._steps.start()

    def check_health(self) -> bool:
        return self._steps.running()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting new requests and wait up to `timeout` s for in-flight ones. True if drained."""
        return await self._admission.drain(timeout)

    async def stop(self) -> None:
        self._admission.accepting = False
        self._steps.stopping = True
        self._steps.wakeup.set()
        if self._steps.thread is not None:
            await asyncio.to_thread(self._steps.thread.join)
        self._steps.handle_inbox(EngineDrainingError("engine stopped"))  # what the thread left: applied here
        for rid in list(self._admission.requests):
            self.abort(rid)

    def _check_fits(self, model_dir: Path, dtype: str, device: str) -> None:
        """Refuses a reload whose weights and KV cache do not fit next to the serving model (both live
        until the old one drains). Raises InsufficientMemoryError."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001 - any parse/validation error is a load error
            raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {type(exc).__name__}: {exc}") from None
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev, config)
        cfg = text_config(config)
        want = getattr(cfg, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        ckpt_dtype = getattr(torch, str(want).removeprefix("torch."), torch.float32)
        ckpt_itemsize = ckpt_dtype.itemsize if isinstance(ckpt_dtype, torch.dtype) else 4
        max_len = min(
            getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN,
            self._max_model_len_arg or DEFAULT_MAX_MODEL_LEN,
        )
        blocks = self._num_blocks(config, max_len, torch_dtype.itemsize, dev, capped=False)
        need = checkpoint_bytes(
            model_dir, torch_dtype.itemsize, ckpt_itemsize
        ) + blocks * self.block_size * kv_bytes_per_token_for(cfg, torch_dtype.itemsize)
        avail = available_memory(dev)
        if avail is not None and need > RELOAD_MEMORY_FRACTION * avail:
            raise InsufficientMemoryError(
                f"the new model and its KV cache need {need / 2**20:.1f} MiB next to the serving model, but "
                f"{avail / 2**20:.1f} MiB is available; restart the pod with the new model instead"
            )

    async def reload(
        self, model_dir: str | Path, revision: str = "", *, dtype: str | None = None, device: str | None = None
    ) -> None:
        """Loads a model next to the serving one; new requests go to it, admitted ones finish on the old
        one. Raises ModelLoadError (InsufficientMemoryError when both would not fit): the old one serves."""
        assert self._reload_lock is not None, "call start() first"
        cur = self._serving.loaded
        dtype = dtype or str(cur.dtype).removeprefix("torch.")
        device = device or cur.device.type
        model_dir = Path(model_dir)
        async with self._reload_lock:
            await asyncio.to_thread(self._check_fits, model_dir, dtype, device)
            loaded = await asyncio.to_thread(load_model, model_dir, dtype, device)
            inst = await asyncio.to_thread(self._make_instance, loaded, revision)
            self._steps.send(("reload", inst))
            self._admission.serving = inst
            log.info("Loaded model for reload model_dir=%s revision=%s", model_dir, revision)

    # ------------------------------------------------------------------ requests (event loop)
    async def add_request(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int = 0,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Admits a request (returns once it is in the engine's queue, before any token). Raises
        InvalidRequestError, QueueFullError, EngineDrainingError, EngineDeadError. ``mm``: the images of
        the prompt (``VisionLanguage.process``) for a vision-language model. ``cache_salt``: its prefix
        is shared only with requests of the same salt."""
        return await self._admission.add(request_id, prompt, params, priority, mm, cache_salt)

    async def generate(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int = 0,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(request_id, prompt, params, priority, mm, cache_salt)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Finishes a request with finish_reason "abort" (its stream gets the final output); unknown ids
        are ignored. Applied by the engine thread before its next step."""
        self._admission.abort(request_id)

    def stats(self) -> EngineStats:
        running, waiting, kv, slots, n_models, blocks = self._steps.snapshot
        return EngineStats(
            kv_blocks_used=blocks[0],
            kv_blocks_total=blocks[1],
            prefix_cache_queries=blocks[2],
            prefix_cache_hits=blocks[3],
            num_preemptions=blocks[4],
            num_running=running,
            num_waiting=waiting,
            kv_cache_usage=kv,
            slot_usage=slots,
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            num_steps=self.num_steps,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            healthy=self.check_health(),
            accepting=self._admission.accepting,
            num_models=n_models,
        )
