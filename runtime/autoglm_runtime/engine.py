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

Threading: one dedicated thread runs the step loop (torch releases the GIL inside kernels) and owns
the schedulers. The event loop never takes a lock that thread holds: admissions, aborts and reloads
are appended to an inbox (a deque) and applied by the engine thread between steps; answers (admitted
or QueueFullError, abort done, outputs) come back with `call_soon_threadsafe`; `stats()` reads a
snapshot the engine thread publishes after every change. Per step: apply the inbox, schedule, build
inputs, one forward + sampling, one host sync (`.tolist()`), then update/detokenize (with
`tokenizers.decoders.DecodeStream`) and hand all outputs of the step to the event loop at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .engine_api import (
    EngineDeadError,
    EngineDrainingError,
    EngineStats,
    InvalidRequestError,
    QueuedStream,
    QueueFullError,
    RequestOutput,
    check_lengths,
)
from .engine_api import (
    FinishReason as OutputFinishReason,
)
from .guided import GuidedDecoder, ResponseFormatError, llg_tokenizer
from .loader import InsufficientMemoryError, LoadedModel, ModelLoadError, load_model, resolve_device, resolve_dtype
from .logprobs import TokenLogprob
from .memory import KV_MEMORY_FRACTION, checkpoint_bytes, kv_cache_blocks
from .model_runner import KVCacheTooLargeError, ModelRunner, available_memory, kv_bytes_per_token_for, text_config
from .sampling import IncrementalDetokenizer, SamplingParams, SamplingState
from .scheduler import FinishReason, Scheduler, Sequence
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


@dataclass
class StepStats:
    batch_size: int  # sequences in the step (decodes + prefill chunks)
    num_decode_tokens: int
    num_prefill_tokens: int
    step_seconds: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float


class _Instance:
    """One loaded model with its KV cache and its scheduler."""

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler: Scheduler, revision: str) -> None:
        self.loaded = loaded
        self.runner = runner
        self.scheduler = scheduler
        self.revision = revision
        backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError("the runtime needs a fast tokenizer (tokenizer.json)")
        self.backend_tokenizer = backend
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.vocab_size = loaded.model.get_input_embeddings().num_embeddings


class _Request:
    __slots__ = (
        "seq",
        "queue",
        "detok",
        "sampling",
        "instance",
        "first_token_time",
        "final_sent",
        "emitted_tokens",
        "pending_logprobs",
    )

    def __init__(self, seq: Sequence, instance: _Instance, params: SamplingParams) -> None:
        self.seq = seq
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = IncrementalDetokenizer(instance.backend_tokenizer, params.stop)
        self.sampling = SamplingState(params, instance.loaded.device)
        self.instance = instance
        self.first_token_time: float | None = None
        self.final_sent = False
        self.emitted_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class _RequestStream(QueuedStream):
    """The outputs of one admitted request (``EngineClient.add_request``'s answer)."""

    def __init__(self, engine: Engine, req: _Request) -> None:
        super().__init__(req.seq.request_id, req.queue)
        self._engine = engine
        self._req = req
        self._closed = False

    async def aclose(self) -> None:
        """Aborts the request if it has not finished and returns once its slot is free."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._req.final_sent:
                await self._engine._abort_and_wait(self._req)
        finally:
            if self._engine._requests.get(self.request_id) is self._req:
                del self._engine._requests[self.request_id]


class Engine:
    """See the module docstring. The event loop never takes a lock the step loop holds: requests,
    aborts and reloads are handed to the engine thread through ``_inbox`` and applied between steps;
    statistics are a snapshot the engine thread publishes after every change."""

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
        self._on_step = on_step
        self._seed = seed
        if num_threads and loaded.device.type == "cpu":
            torch.set_num_threads(num_threads)
        first = self._make_instance(loaded, revision)
        self._serving: _Instance = first  # where new requests go (owned by the event loop)
        self._instances: list[_Instance] = [first]  # every live model (owned by the engine thread)
        self._requests: dict[str, _Request] = {}  # owned by the event loop
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wakeup = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._retired = (0, 0, 0)  # prefix cache queries, hits, preemptions of released models
        self._snapshot: tuple[Any, ...] = (0, 0, 0.0, 0.0, 1, (0, 0, 0, 0, 0))
        self._publish_stats()

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

    def _make_instance(self, loaded: LoadedModel, revision: str) -> _Instance:
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
        return _Instance(loaded, runner, scheduler, revision)

    # ------------------------------------------------------------------ properties
    @property
    def _current(self) -> _Instance:
        return self._serving

    @property
    def tokenizer(self):
        return self._current.loaded.tokenizer

    @property
    def model_dir(self) -> Path:
        return self._current.loaded.model_dir

    @property
    def model_name(self) -> str:
        return self._current.loaded.model_dir.name

    @property
    def revision(self) -> str:
        return self._current.revision

    @property
    def max_model_len(self) -> int:
        return self._current.scheduler.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self._current.eos_token_ids)

    @property
    def vision(self) -> VisionLanguage | None:
        """The current model's vision half (None for text-only models); see vision.py."""
        return self._current.runner.vl

    @property
    def device(self) -> torch.device:
        return self._current.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self._current.loaded.dtype

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        self._thread.start()

    def check_health(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def _thread_running(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting new requests and wait up to `timeout` s for in-flight ones. True if drained."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._requests and self.check_health():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return not self._requests

    async def stop(self) -> None:
        self._accepting = False
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._handle_inbox(EngineDrainingError("engine stopped"))  # what the thread left: applied here
        for rid in list(self._requests):
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
        cur = self._current.loaded
        dtype = dtype or str(cur.dtype).removeprefix("torch.")
        device = device or cur.device.type
        model_dir = Path(model_dir)
        async with self._reload_lock:
            await asyncio.to_thread(self._check_fits, model_dir, dtype, device)
            loaded = await asyncio.to_thread(load_model, model_dir, dtype, device)
            inst = await asyncio.to_thread(self._make_instance, loaded, revision)
            self._send(("reload", inst))
            self._serving = inst
            log.info("Loaded model for reload model_dir=%s revision=%s", model_dir, revision)

    # ------------------------------------------------------------------ requests (event loop)
    def _send(self, command: tuple[Any, ...]) -> None:
        self._inbox.append(command)
        self._wakeup.set()

    def _new_request(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> _Request:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        if not self._accepting:
            raise EngineDrainingError("engine is draining and admits no new requests")
        if self._thread is None:
            raise RuntimeError("call Engine.start() first")
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        inst = self._current
        ids = list(inst.loaded.tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
        max_tokens = check_lengths(len(ids), params.max_tokens, inst.scheduler.max_model_len)
        if min(ids) < 0 or max(ids) >= inst.vocab_size:
            raise InvalidRequestError(
                f"prompt has token ids outside the vocabulary [0, {inst.vocab_size})", param="prompt"
            )
        if mm is not None and (inst.runner.vl is None or mm.positions.shape[1] != len(ids)):
            raise InvalidRequestError(
                "images were given for a model that does not take them (or for other prompt ids)",
                param="messages",
                code="images_not_supported",
            )
        seq = Sequence(
            mm=mm,
            request_id=request_id,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            eos_token_ids=inst.eos_token_ids,
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            priority=priority,
            mm_spans=mm.spans if mm is not None else [],
            cache_salt=cache_salt,
        )
        req = _Request(seq, inst, params)
        seq.data = req
        return req

    @staticmethod
    def _make_guide(inst: _Instance, grammar: str) -> GuidedDecoder:
        try:
            lltok = llg_tokenizer(inst.loaded.tokenizer, inst.runner.vocab_size, inst.loaded.eos_token_ids)
            return GuidedDecoder(lltok, grammar)
        except ResponseFormatError as exc:
            raise InvalidRequestError(f"response_format cannot be enforced: {exc}", param="response_format") from None

    async def add_request(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int = 0,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> _RequestStream:
        """Admits a request (returns once it is in the engine's queue, before any token). Raises
        InvalidRequestError, QueueFullError, EngineDrainingError, EngineDeadError. ``mm``: the images of
        the prompt (``VisionLanguage.process``) for a vision-language model. ``cache_salt``: its prefix
        is shared only with requests of the same salt."""
        req = self._new_request(request_id, prompt, params, priority, mm, cache_salt)
        if params.grammar is not None:
            # response_format: the grammar's matcher is made now (off the event loop: the first one of a
            # model builds its llguidance tokenizer), so the engine thread cannot fail on it later.
            req.sampling.guide = await asyncio.to_thread(self._make_guide, req.instance, params.grammar)
            if not self._accepting:  # drain()/stop() began meanwhile
                raise EngineDrainingError("engine is draining and admits no new requests")
        assert self._loop is not None
        admitted = self._loop.create_future()
        self._requests[request_id] = req
        self._send(("add", req, admitted))
        try:
            while not admitted.done():
                await asyncio.wait({admitted}, timeout=0.5)
                if not admitted.done() and not self._thread_running():  # died (or stopped) before it got there
                    admitted.set_exception(EngineDeadError(f"engine loop died: {self._dead!r}"))
            admitted.result()
        except BaseException:
            # Cancelled while queued, or after the engine admitted it (the answer was set but this task
            # was cancelled before it resumed): either way the sequence must not run on unread.
            if not admitted.done() or admitted.cancelled() or admitted.exception() is None:
                self._send(("abort", req, None))
            if self._requests.get(request_id) is req:
                del self._requests[request_id]
            raise
        return _RequestStream(self, req)

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
        req = self._requests.get(request_id)
        if req is None:
            return
        if self._thread_running():
            self._send(("abort", req, None))
        else:
            self._abort_now(req)

    async def _abort_and_wait(self, req: _Request) -> None:
        """Aborts and returns once the engine has freed the request's slot."""
        if not self._thread_running():
            self._abort_now(req)
            return
        assert self._loop is not None
        done = self._loop.create_future()
        self._send(("abort", req, done))
        while not done.done():
            await asyncio.wait({done}, timeout=0.5)
            if not done.done() and not self._thread_running():  # the thread ended before it got there
                self._abort_now(req)
                return

    def _abort_now(self, req: _Request) -> None:
        if req.seq.is_finished:
            return
        req.instance.scheduler.finish(req.seq, FinishReason.ABORT)
        self._publish_stats()
        self._deliver([(req, self._output(req, [], "", finished=True, now=time.monotonic()))])

    def stats(self) -> EngineStats:
        running, waiting, kv, slots, n_models, blocks = self._snapshot
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
            accepting=self._accepting,
            num_models=n_models,
        )

    def _publish_stats(self) -> None:
        inst = list(self._instances)
        self._snapshot = (
            sum(i.scheduler.num_running for i in inst),
            sum(i.scheduler.num_waiting for i in inst),
            sum(i.scheduler.kv_cache_usage for i in inst) / len(inst),
            sum(i.scheduler.slot_usage for i in inst) / len(inst),
            len(inst),
            (
                sum(i.scheduler.blocks.num_used_blocks for i in inst),
                sum(i.scheduler.blocks.num_usable_blocks for i in inst),
                self._retired[0] + sum(i.scheduler.blocks.queries for i in inst),
                self._retired[1] + sum(i.scheduler.blocks.hits for i in inst),
                self._retired[2] + sum(i.scheduler.num_preemptions for i in inst),
            ),
        )

    # ------------------------------------------------------------------ output plumbing
    def _output(self, req: _Request, new_ids: list[int], text: str, finished: bool, now: float) -> RequestOutput:
        seq = req.seq
        if finished and seq.mm is not None:
            seq.mm.release()
        lps = None
        if req.sampling.params.logprobs is not None:
            lps, req.pending_logprobs = req.pending_logprobs[: len(new_ids)], req.pending_logprobs[len(new_ids) :]
        return RequestOutput(
            logprobs=lps,
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=finished,
            finish_reason=cast(OutputFinishReason, seq.finish_reason) if finished else None,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_token_ids),
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=now if finished else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, items: list[tuple[_Request, object]]) -> None:
        self._call_on_loop(self._dispatch, items)

    @staticmethod
    def _dispatch(items: list[tuple[_Request, object]]) -> None:
        for req, item in items:
            if req.final_sent:
                continue
            if isinstance(item, BaseException) or item.finished:  # type: ignore[attr-defined]
                req.final_sent = True
            req.queue.put_nowait(item)

    # ------------------------------------------------------------------ step loop (engine thread)
    def _handle_inbox(self, refuse: BaseException | None = None) -> None:
        """Applies the commands the event loop sent (in order), publishes the stats, then answers: whoever
        was told "admitted" or "aborted" reads stats that include it. With ``refuse``, admissions fail with it."""
        replies: list[tuple[asyncio.Future, BaseException | None]] = []
        while self._inbox:
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                _, req, admitted = cmd
                error: BaseException | None = refuse
                if error is None:
                    try:
                        req.instance.scheduler.add_request(req.seq)
                    except QueueFullError as exc:
                        error = exc
                    except Exception as exc:  # noqa: BLE001 - fails this request only, never the loop
                        log.exception("Failed to admit request request_id=%s", req.seq.request_id)
                        error = exc
                replies.append((admitted, error))
            elif cmd[0] == "abort":
                _, req, done = cmd
                self._abort_now(req)
                if done is not None:
                    replies.append((done, None))
            elif cmd[0] == "reload":
                self._instances.append(cmd[1])
        self._publish_stats()
        for fut, error in replies:
            self._call_on_loop(_resolve, fut, error)

    def _release_idle_models(self) -> None:
        if len(self._instances) > 1:  # an old model with no work left after a reload is released
            cur = self._instances[-1]
            for i in self._instances[:-1]:
                if not i.scheduler.has_work():  # its counters live on in the totals
                    b = i.scheduler.blocks
                    q, h, p = self._retired
                    self._retired = (q + b.queries, h + b.hits, p + i.scheduler.num_preemptions)
            self._instances = [i for i in self._instances[:-1] if i.scheduler.has_work()] + [cur]
            self._publish_stats()

    def _run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                self._handle_inbox()
                self._release_idle_models()
                if self._stopping:
                    return
                if not any(i.scheduler.has_work() for i in self._instances):
                    self._wakeup.wait()
                    continue
                work = []
                for inst in self._instances:
                    out = inst.scheduler.schedule()
                    if out.is_empty:
                        continue
                    states = [s.data.sampling for s in out.sampled_sequences]
                    self._publish_stats()
                    work.append((inst, out, inst.runner.prepare(out, states)))
                for inst, out, step in work:
                    t0 = time.perf_counter()
                    tokens = inst.runner.execute(step).tolist()
                    self._finish_step(inst, out, tokens, time.perf_counter() - t0, step.logprobs)
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            log.exception("Engine step loop died")
            self._dead = exc
            err = EngineDeadError(f"engine loop died: {exc!r}")
            self._deliver([(r, err) for r in list(self._requests.values())])
            self._handle_inbox(err)

    def _finish_step(
        self,
        inst: _Instance,
        out,
        tokens: list[int],
        seconds: float,
        logprobs: dict[int, TokenLogprob] | None = None,
    ) -> None:
        sched = inst.scheduler
        if logprobs:
            for row, seq in enumerate(out.sampled_sequences):
                if row in logprobs and not seq.is_finished:
                    seq.data.pending_logprobs.append(logprobs[row])
        updated = sched.update_from_output(out, tokens)
        now = time.monotonic()
        items: list[tuple[_Request, object]] = []
        stop_hits = []
        texts = []
        for seq in updated:
            req: _Request = seq.data
            if req.first_token_time is None:
                req.first_token_time = now
            # Stop strings count only after min_tokens tokens (vLLM's rule).
            check_stop = len(seq.output_token_ids) > req.sampling.params.min_tokens
            guide_done = False
            guide = req.sampling.guide
            if guide is not None and not seq.is_finished:
                guide.consume(seq.output_token_ids[-1])
                guide_done = guide.done  # the response_format grammar is complete: stop here
            texts.append(
                req.detok.step(seq.output_token_ids, final=seq.is_finished or guide_done, check_stop=check_stop)
            )
            if (req.detok.stopped or guide_done) and not seq.is_finished:
                stop_hits.append(seq)
        for seq in stop_hits:
            sched.finish(seq, FinishReason.STOP)
        for seq, text in zip(updated, texts, strict=True):
            req = seq.data
            if seq.finish_reason == FinishReason.ABORT:
                continue  # abort() already delivered the final output
            new_ids = seq.output_token_ids[req.emitted_tokens :]
            req.emitted_tokens = len(seq.output_token_ids)
            items.append((req, self._output(req, new_ids, text, seq.is_finished, now)))
        self.num_steps += 1
        self.prompt_tokens_total += out.num_prefill_tokens
        self.generation_tokens_total += len(updated)
        self._publish_stats()
        if items:
            self._deliver(items)
        if self._on_step is not None:
            try:
                self._on_step(
                    StepStats(
                        batch_size=len(out.decodes) + len(out.prefills),
                        num_decode_tokens=len(out.decodes),
                        num_prefill_tokens=out.num_prefill_tokens,
                        step_seconds=seconds,
                        num_running=sched.num_running,
                        num_waiting=sched.num_waiting,
                        kv_cache_usage=sched.kv_cache_usage,
                    )
                )
            except Exception:  # noqa: BLE001 - a metrics hook must never kill the loop
                log.exception("on_step hook failed")
