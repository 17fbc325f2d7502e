"""The inference engine the HTTP layer talks to (the shape of vLLM's AsyncLLM).

API (all coroutine methods must be called on one asyncio event loop, the server's):

    engine = Engine(load_model(dir), max_batch_size=32, max_queue=256, max_batch_tokens=2048,
                    max_model_len=None, revision="", on_step=None, num_threads=None, seed=None)
    # max_model_len: None = min(model's max_position_embeddings, 8192). The KV cache is
    # preallocated as max_batch_size x max_model_len slots; KVCacheTooLargeError (a ValueError and
    # a ModelLoadError) when that does not fit in memory. num_threads: torch intra-op threads (CPU).
    await engine.start()

    async for out in engine.generate(request_id, prompt, params, priority=0):
        # prompt: list[int] token ids, or a str (tokenized as `tokenizer.encode(prompt)` with the
        #         tokenizer of the model that will serve it, which matters only around reload())
        # out: RequestOutput(request_id, new_token_ids, new_text, finished, finish_reason,
        #                    prompt_tokens, completion_tokens, arrival_time, first_scheduled_time,
        #                    first_token_time, finish_time)   # times: time.monotonic()
        ...
    # Raised at the first `__anext__()`, before any output:
    #   QueueFullError      the waiting queue holds max_queue requests        -> 429/503
    #   InvalidRequestError empty/too-long prompt, duplicate id (ValueError)  -> 400
    #   EngineDrainingError drain()/stop() was called                         -> 503
    #   EngineDeadError     the step loop died (also raised mid-stream)       -> 500/503
    # Leaving the loop early (break, client disconnect -> CancelledError/GeneratorExit) aborts the
    # request and frees its slot; wrap in `contextlib.aclosing()` so that happens immediately.

    engine.abort(request_id)          # finishes it with finish_reason "abort"; unknown ids ignored
    engine.check_health() -> bool     # False once the step loop has died (or before start/after stop)
    engine.stats() -> EngineStats     # num_running, num_waiting, kv_cache_usage, slot_usage, ...
    await engine.reload(model_dir, revision="")  # load in a thread, then new requests go to the new
                                      # model; requests already admitted finish on the old one, which
                                      # is freed when it has drained. Raises ModelLoadError (old model
                                      # keeps serving).
    await engine.drain(timeout) -> bool   # stop admitting; wait until in-flight requests finish
    await engine.stop()               # stop the loop; unfinished requests end with "abort"
    engine.tokenizer, engine.model_dir, engine.model_name, engine.revision, engine.max_model_len,
    engine.eos_token_ids, engine.device, engine.dtype

Metrics hook (no prometheus import here): `on_step(StepStats)` is called on the engine thread after
every step (keep it fast and thread-safe; prometheus_client metrics are). Per-request timings come
with every RequestOutput.

Threading: one dedicated thread runs the step loop (torch releases the GIL inside kernels). Per
step: schedule + build inputs under a lock, one forward + sampling without it, one host sync
(`.tolist()`), then update/detokenize and hand all outputs of the step to the event loop with a
single `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .guided import GuidedDecoder, ResponseFormatError, llg_tokenizer
from .loader import LoadedModel, ModelLoadError, load_model
from .logprobs import TokenLogprob
from .model_runner import ModelRunner
from .sampling import IncrementalDetokenizer, SamplingParams, SamplingState, byte_level_token_bytes
from .scheduler import FinishReason, QueueFullError, Scheduler, Sequence
from .vision import MultiModalInputs, VisionLanguage

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineDrainingError",
    "EngineStats",
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


class EngineDeadError(RuntimeError):
    """The engine's step loop has died; the process should be restarted."""


class EngineDrainingError(RuntimeError):
    """The engine is draining or stopped and admits no new requests."""


class InvalidRequestError(ValueError):
    """The request can never be served as given (empty or too long prompt, duplicate id)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    prompt_tokens: int
    completion_tokens: int
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked (params.logprobs)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class StepStats:
    batch_size: int  # sequences in the step (decodes + prefill chunks)
    num_decode_tokens: int
    num_prefill_tokens: int
    step_seconds: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, fraction of the slot cache's positions holding live KV
    slot_usage: float  # 0..1, running / max_batch_size
    max_batch_size: int
    max_queue: int
    num_steps: int
    prompt_tokens_total: int
    generation_tokens_total: int
    healthy: bool
    accepting: bool
    num_models: int  # > 1 while an old model drains after reload()


class _Instance:
    """One loaded model with its KV cache and its scheduler."""

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler: Scheduler, revision: str) -> None:
        self.loaded = loaded
        self.runner = runner
        self.scheduler = scheduler
        self.revision = revision
        tok = loaded.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        # Raw bytes per token id for exact incremental UTF-8 detokenization (None: decode via the tokenizer).
        self.token_bytes = byte_level_token_bytes(tok)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.vocab_size = loaded.model.get_input_embeddings().num_embeddings


class _Request:
    __slots__ = ("seq", "queue", "detok", "sampling", "instance", "first_token_time", "final_sent", "emitted_tokens",
                 "pending_logprobs")

    def __init__(self, seq: Sequence, instance: _Instance, params: SamplingParams) -> None:
        self.seq = seq
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = IncrementalDetokenizer(instance.decode, params.stop, instance.token_bytes)
        self.sampling = SamplingState(params, instance.loaded.device)
        self.instance = instance
        self.first_token_time: float | None = None
        self.final_sent = False
        self.emitted_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []


class Engine:
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
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max(max_batch_tokens, max_batch_size)
        self._max_model_len_arg = max_model_len
        self._on_step = on_step
        self._seed = seed
        if num_threads and loaded.device.type == "cpu":
            torch.set_num_threads(num_threads)
        self._lock = threading.Condition(threading.Lock())
        self._instances: list[_Instance] = [self._make_instance(loaded, revision)]
        self._requests: dict[str, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _make_instance(self, loaded: LoadedModel, revision: str) -> _Instance:
        max_len = min(loaded.max_model_len, self._max_model_len_arg or DEFAULT_MAX_MODEL_LEN)
        runner = ModelRunner(loaded, self.max_batch_size, max_len, seed=self._seed)
        scheduler = Scheduler(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_batch_tokens=self.max_batch_tokens,
            max_model_len=max_len,
        )
        return _Instance(loaded, runner, scheduler, revision)

    # ------------------------------------------------------------------ properties
    @property
    def _current(self) -> _Instance:
        return self._instances[-1]

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
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for rid in list(self._requests):
            self.abort(rid)

    async def reload(self, model_dir: str | Path, revision: str = "", *, dtype: str | None = None, device: str | None = None) -> None:
        assert self._reload_lock is not None, "call start() first"
        cur = self._current.loaded
        dtype = dtype or str(cur.dtype).removeprefix("torch.")
        device = device or cur.device.type
        async with self._reload_lock:
            loaded = await asyncio.to_thread(load_model, model_dir, dtype, device)
            inst = await asyncio.to_thread(self._make_instance, loaded, revision)
            with self._lock:
                self._instances.append(inst)
                self._lock.notify_all()
            log.info("Loaded model for reload model_dir=%s revision=%s", model_dir, revision)

    # ------------------------------------------------------------------ requests
    def _admit(self, request_id: str, prompt: list[int] | str, params: SamplingParams, priority: int,
               mm: MultiModalInputs | None = None) -> _Request:
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
        max_len = inst.scheduler.max_model_len
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= max_len:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; this model accepts at most {max_len - 1}")
        if min(ids) < 0 or max(ids) >= inst.vocab_size:
            raise InvalidRequestError(f"prompt has token ids outside the vocabulary [0, {inst.vocab_size})")
        if mm is not None and (inst.runner.vl is None or mm.positions.shape[1] != len(ids)):
            raise InvalidRequestError("images were given for a model that does not take them (or for other prompt ids)")
        seq = Sequence(
            mm=mm,
            request_id=request_id,
            prompt_token_ids=ids,
            max_tokens=min(params.max_tokens, max_len - len(ids)),
            eos_token_ids=inst.eos_token_ids,
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            priority=priority,
        )
        req = _Request(seq, inst, params)
        if params.grammar is not None:  # response_format: a grammar the engine thread cannot fail on later
            try:
                lltok = llg_tokenizer(inst.loaded.tokenizer, inst.runner.vocab_size, inst.loaded.eos_token_ids)
                req.sampling.guide = GuidedDecoder(lltok, params.grammar)
            except ResponseFormatError as exc:
                raise InvalidRequestError(f"response_format cannot be enforced: {exc}") from None
        seq.data = req
        with self._lock:
            inst.scheduler.add_request(seq)  # QueueFullError
            self._requests[request_id] = req
            self._lock.notify_all()
        return req

    async def generate(
        self, request_id: str, prompt: list[int] | str, params: SamplingParams, priority: int = 0,
        mm: MultiModalInputs | None = None,
    ) -> AsyncIterator[RequestOutput]:
        req = self._admit(request_id, prompt, params, priority, mm)
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not req.final_sent:
                self.abort(request_id)
            if self._requests.get(request_id) is req:
                del self._requests[request_id]

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        with self._lock:
            seq = req.instance.scheduler.abort(request_id)
        if seq is not None:
            self._deliver([(req, self._output(req, [], "", finished=True, now=time.monotonic()))])

    def stats(self) -> EngineStats:
        with self._lock:
            running = sum(i.scheduler.num_running for i in self._instances)
            waiting = sum(i.scheduler.num_waiting for i in self._instances)
            kv = sum(i.scheduler.kv_cache_usage for i in self._instances) / len(self._instances)
            slots = sum(i.scheduler.slot_usage for i in self._instances) / len(self._instances)
            n_models = len(self._instances)
        return EngineStats(
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

    # ------------------------------------------------------------------ output plumbing
    def _output(self, req: _Request, new_ids: list[int], text: str, finished: bool, now: float) -> RequestOutput:
        seq = req.seq
        lps = None
        if req.sampling.params.logprobs is not None:
            lps, req.pending_logprobs = req.pending_logprobs[: len(new_ids)], req.pending_logprobs[len(new_ids):]
        return RequestOutput(
            logprobs=lps,
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_token_ids),
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=req.first_token_time,
            finish_time=now if finished else None,
        )

    def _deliver(self, items: list[tuple[_Request, object]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._dispatch(items)
        else:
            loop.call_soon_threadsafe(self._dispatch, items)

    @staticmethod
    def _dispatch(items: list[tuple[_Request, object]]) -> None:
        for req, item in items:
            if req.final_sent:
                continue
            if isinstance(item, BaseException) or item.finished:  # type: ignore[attr-defined]
                req.final_sent = True
            req.queue.put_nowait(item)

    # ------------------------------------------------------------------ step loop (engine thread)
    def _run(self) -> None:
        try:
            while True:
                work = []
                with self._lock:
                    while not self._stopping and not any(i.scheduler.has_work() for i in self._instances):
                        # An old model with no work left after a reload is released here.
                        if len(self._instances) > 1:
                            self._instances = [i for i in self._instances[:-1] if i.scheduler.has_work()] + [self._current]
                        self._lock.wait()
                    if self._stopping:
                        return
                    if len(self._instances) > 1:
                        self._instances = [i for i in self._instances[:-1] if i.scheduler.has_work()] + [self._current]
                    for inst in self._instances:
                        out = inst.scheduler.schedule()
                        if out.is_empty:
                            if out.moves:
                                inst.runner.apply_moves(out.moves)
                            continue
                        states = [s.data.sampling for s in out.sampled_sequences]
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

    def _finish_step(self, inst: _Instance, out, tokens: list[int], seconds: float,
                     logprobs: dict[int, TokenLogprob] | None = None) -> None:
        sched = inst.scheduler
        if logprobs:
            for row, seq in enumerate(out.sampled_sequences):
                if row in logprobs and not seq.is_finished:
                    seq.data.pending_logprobs.append(logprobs[row])
        with self._lock:
            updated = sched.update_from_output(out, tokens)
        now = time.monotonic()
        items = []
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
            texts.append(req.detok.step(seq.output_token_ids, final=seq.is_finished or guide_done,
                                        check_stop=check_stop))
            if (req.detok.stopped or guide_done) and not seq.is_finished:
                stop_hits.append(seq)
        if stop_hits:
            with self._lock:
                for seq in stop_hits:
                    sched.finish(seq, FinishReason.STOP)
        for seq, text in zip(updated, texts):
            req = seq.data
            if seq.finish_reason == FinishReason.ABORT:
                continue  # abort() already delivered the final output
            new_ids = seq.output_token_ids[req.emitted_tokens :]
            req.emitted_tokens = len(seq.output_token_ids)
            items.append((req, self._output(req, new_ids, text, seq.is_finished, now)))
        self.num_steps += 1
        self.prompt_tokens_total += out.num_prefill_tokens
        self.generation_tokens_total += len(updated)
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
