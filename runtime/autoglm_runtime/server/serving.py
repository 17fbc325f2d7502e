"""Serving logic: OpenAI requests in, engine calls out.

The HTTP layer (``api.py``) only parses and routes; everything that knows about tokens lives here:
tokenization and chat templates, ``max_tokens`` against ``max_model_len``, sampling parameters,
stop strings, usage counts, finish reasons, metrics per request, and the server's lifecycle state
(readiness, draining, in-flight requests, hot reload).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from autoglm_runtime.config import RuntimeSettings
from autoglm_runtime.guided import ResponseFormatError, compile_response_format
from autoglm_runtime.logprobs import chat_logprobs, completion_logprobs
from autoglm_runtime.metrics import RequestTimer, RuntimeMetrics
from autoglm_runtime.multimodal import MediaError, chat_prompt_with_images, has_images
from autoglm_runtime.sampling import byte_level_token_bytes
from autoglm_runtime.server import errors
from autoglm_runtime.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
    random_id,
)

log = logging.getLogger("autoglm_runtime.server")


class EngineClient(Protocol):
    """What the HTTP layer needs from the engine (``autoglm_runtime.engine.Engine`` provides it)."""

    tokenizer: Any

    @property
    def vision(self) -> Any: ...  # vision.VisionLanguage of a vision-language model, None for a text-only one

    def generate(self, request_id: str, prompt_token_ids: list[int], params: Any, priority: int = 0,
                 mm: Any = None) -> Any: ...
    def abort(self, request_id: str) -> Any: ...
    def check_health(self) -> bool: ...
    async def start(self) -> None: ...
    async def reload(self, model_dir: Any, revision: str = "") -> Any: ...
    async def drain(self, timeout: float) -> Any: ...
    async def stop(self) -> None: ...
    def stats(self) -> Any: ...  # .num_running, .num_waiting, .kv_cache_usage


def _queue_full_types() -> tuple[type[BaseException], ...]:
    try:
        from autoglm_runtime.scheduler import QueueFullError
    except ImportError:  # engine not built yet: nothing can be raised
        return ()
    return (QueueFullError,)


def _model_load_error_types() -> tuple[type[BaseException], ...]:
    try:
        from autoglm_runtime.loader import ModelLoadError
    except ImportError:
        return ()
    return (ModelLoadError,)


def _engine_error(exc: BaseException) -> errors.APIError | None:
    """The HTTP error for an engine exception, or None when it is not one the engine documents."""
    name = type(exc).__name__
    if name == "EngineDrainingError":
        return errors.DrainingError()
    if name == "EngineDeadError":
        return errors.ServiceUnavailableError(f"The inference engine is not running: {exc}", code="engine_dead")
    return None


def _sampling_params_class() -> Any:
    from autoglm_runtime.sampling import SamplingParams

    return SamplingParams


def _accepted_fields(cls: Any) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    fields = getattr(cls, "model_fields", None)
    if fields is not None:
        return set(fields)
    return set(inspect.signature(cls).parameters)


# ------------------------------------------------------------------ server state


class ServerState:
    """Lifecycle of one server: readiness, draining, in-flight requests, hot reload."""

    def __init__(self, settings: RuntimeSettings, engine: EngineClient, metrics: RuntimeMetrics,
                 max_model_len: int) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.started = False
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._reload_lock: asyncio.Lock | None = None
        metrics.bind_stats(engine.stats)

    # ---- readiness ----
    def healthy(self) -> bool:
        try:
            return bool(self.engine.check_health())
        except Exception:  # noqa: BLE001 - an engine that cannot answer is not healthy
            log.exception("Failed health check")
            return False

    def ready(self) -> bool:
        return self.started and not self.draining and self.healthy()

    # ---- in-flight accounting ----
    def admit(self) -> "_Slot":
        if self.draining:
            raise errors.DrainingError()
        if not self.started:
            raise errors.ServiceUnavailableError("The model is not loaded yet.", code="not_ready", retry_after=1)
        self.inflight += 1
        self._idle.clear()
        return _Slot(self)

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait (at most ``timeout`` s) for in-flight requests. True if all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        log.info("Started draining, in_flight=%d timeout_s=%.1f", self.inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("Drain timed out, in_flight=%d", self.inflight)
            return False
        try:
            await asyncio.wait_for(self.engine.drain(max(0.0, deadline - time.monotonic())),
                                   timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return False
        log.info("Drained all requests")
        return True

    # ---- hot reload ----
    async def reload(self, model: str | None = None, revision: str | None = None) -> dict[str, Any]:
        if self.draining:
            raise errors.DrainingError()
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            model_dir = Path(model) if model else self.settings.model
            if not model_dir.is_dir():
                raise errors.BadRequestError(f"Model directory {model_dir} does not exist.", param="model",
                                             code="model_not_found")
            started = time.monotonic()
            log.info("Started hot reload, model=%s", model_dir)
            try:
                await self.engine.reload(model_dir, revision=revision or self.metrics.revision)
            except _model_load_error_types() as exc:
                self.metrics.reloads_total.labels(*self.metrics.labels, "error").inc()
                log.error("Failed hot reload, model=%s error=%s", model_dir, exc)
                raise errors.BadRequestError(f"Cannot load model from {model_dir}: {exc}", param="model",
                                             code="model_load_failed") from None
            self.settings.model = model_dir
            new_len = getattr(self.engine, "max_model_len", None)
            if isinstance(new_len, int) and new_len > 0:
                self.max_model_len = new_len
            self.metrics.set_labels(revision=revision)
            self.metrics.reloads_total.labels(*self.metrics.labels, "success").inc()
            seconds = time.monotonic() - started
            log.info("Finished hot reload, model=%s seconds=%.2f", model_dir, seconds)
            return {"status": "reloaded", "model": str(model_dir), "revision": self.metrics.revision,
                    "seconds": round(seconds, 3)}


class _Slot:
    """One admitted request; ``release()`` is idempotent."""

    __slots__ = ("state", "released")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state._release()


# ------------------------------------------------------------------ stop strings


class StopChecker:
    """Finds stop strings in streamed text, holding back just enough text to never emit part of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found — generation ends there)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        cut = max(0, len(buf) - self.hold)
        self.pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ------------------------------------------------------------------ generation


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Any] | None = None  # logprobs.TokenLogprob per token id, when asked for


_FINISH_REASONS = {"stop": "stop", "eos": "stop", "stop_string": "stop", "stop_token": "stop", "length": "length",
                   "max_tokens": "length", "abort": "abort", "aborted": "abort", "cancelled": "abort"}


class Generation:
    """One admitted request in the engine: first output awaited at start (so 429 comes before a stream
    starts), then deltas with stop strings applied; usage and metrics are kept as it goes."""

    def __init__(self, serving: "OpenAIServing", request_id: str, prompt_ids: list[int], params: Any,
                 priority: int, stops: list[str], slot: _Slot, mm: Any = None) -> None:
        self.serving = serving
        self.engine = serving.state.engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.stopper = StopChecker(stops)
        self.slot = slot
        self.mm = mm  # multimodal inputs (images) for a vision-language engine
        self.arrival = time.monotonic()
        self.timer = RequestTimer(serving.state.metrics, self.arrival)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[Any] = []  # all TokenLogprobs so far (when the request asked)
        self.finish_reason: str | None = None
        self._it: Any = None
        self._first: Any = None
        self._closed = False
        self._engine_finished = False
        timeout = serving.state.settings.request_timeout_seconds
        self.deadline = self.arrival + timeout if timeout else None

    @property
    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=len(self.prompt_ids), completion_tokens=self.completion_tokens,
                         total_tokens=len(self.prompt_ids) + self.completion_tokens)

    async def start(self) -> None:
        try:
            gen = self.engine.generate(self.request_id, self.prompt_ids, self.params, priority=self.priority,
                                       mm=self.mm)
            if inspect.isawaitable(gen):
                gen = await gen
            self._it = gen.__aiter__()
            self._first = await self._next()
        except _queue_full_types():
            await self.close("rejected")
            raise errors.QueueFullAPIError() from None
        except errors.RequestTimeoutError:
            await self.close("aborted")  # timed out before the first output (e.g. while queued)
            raise
        except errors.APIError:
            await self.close("error")
            raise
        except ValueError as exc:  # InvalidRequestError: the engine refused the request's parameters
            await self.close("invalid")
            raise errors.BadRequestError(str(exc)) from None
        except BaseException as exc:
            mapped = _engine_error(exc)
            await self.close("aborted" if isinstance(exc, asyncio.CancelledError) else
                             "rejected" if isinstance(mapped, errors.DrainingError) else "error")
            if mapped is not None:
                raise mapped from None
            raise

    async def _next(self) -> Any:
        try:
            if self.deadline is None:
                return await self._it.__anext__()
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._it.__anext__(), remaining)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise errors.RequestTimeoutError(
                f"The request ran longer than {self.serving.state.settings.request_timeout_seconds}s.") from None

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yields deltas until finished; always ends with a delta that carries a finish reason."""
        status = "error"
        try:
            out = self._first
            self._first = None
            while out is not None:
                ids = list(getattr(out, "new_token_ids", None) or [])
                lps = getattr(out, "logprobs", None)
                self.logprobs.extend(lps or [])
                self.timer.tokens(time.monotonic(), len(ids))
                self.completion_tokens += len(ids)
                self.token_ids.extend(ids)
                text, stopped = self.stopper.feed(getattr(out, "new_text", "") or "")
                if stopped:
                    self.finish_reason = "stop"
                    status = "success"
                    yield Delta(text, ids, "stop", lps)
                    return
                if getattr(out, "finished", False):
                    self._engine_finished = True
                    reason = getattr(out, "finish_reason", None) or "stop"
                    self.finish_reason = _FINISH_REASONS.get(str(reason), str(reason))
                    status = "aborted" if self.finish_reason == "abort" else "success"
                    yield Delta(text + self.stopper.flush(), ids, self.finish_reason, lps)
                    return
                if text or ids:
                    yield Delta(text, ids, None, lps)
                out = await self._next()
            # The engine's iterator ended without a finished output: treat as aborted.
            self.finish_reason = "abort"
            status = "aborted"
            yield Delta(self.stopper.flush(), [], "abort")
        except (asyncio.CancelledError, GeneratorExit):
            status = "aborted"
            raise
        except errors.RequestTimeoutError:
            status = "aborted"
            raise
        except Exception as exc:
            mapped = _engine_error(exc)
            if mapped is not None:
                raise mapped from None
            raise
        finally:
            await self.close(status)

    async def close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._engine_finished:
                # Abandoned, failed or stopped by a stop string here: free the engine slot now.
                try:
                    self.engine.abort(self.request_id)
                except Exception:  # noqa: BLE001 - an unknown or finished id is fine
                    pass
            if self._it is not None and hasattr(self._it, "aclose"):
                try:
                    await asyncio.shield(self._it.aclose())
                except (Exception, asyncio.CancelledError):  # noqa: BLE001
                    pass
        finally:
            if status != "rejected":
                self.timer.done(time.monotonic(), len(self.prompt_ids), self.completion_tokens, status)
            else:
                self.serving.state.metrics.request_finished("rejected")
            self.slot.release()


# ------------------------------------------------------------------ OpenAI serving


def _sse(obj: Any) -> str:
    payload = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    """Completions and chat completions on top of one engine."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._sampling_cls: Any = None
        self._sampling_fields: set[str] = set()
        self._token_bytes: tuple[Any, list[bytes] | None] | None = None  # (tokenizer, raw bytes per token id)

    @property
    def model_name(self) -> str:
        return self.state.settings.model_name

    # ---- shared steps ----
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise errors.ModelNotFoundError(model, self.model_name)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, root=str(self.state.settings.model),
                                         max_model_len=self.state.max_model_len)])

    def _tokenizer(self) -> Any:
        return self.state.engine.tokenizer

    def _tokenize(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            vocab = getattr(self._tokenizer(), "vocab_size", None)
            if vocab is not None and any(t < 0 or t >= len(self._tokenizer()) for t in prompt):
                raise errors.BadRequestError("prompt contains token ids outside the vocabulary.", param="prompt")
            return list(prompt)
        ids = self._tokenizer()(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise errors.BadRequestError("prompt is empty after tokenization.", param="prompt")
        return list(ids)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self._tokenizer()
        try:
            messages = [m.to_template() for m in req.messages]
        except ValueError as exc:
            raise errors.BadRequestError(str(exc), param="messages") from None
        if not getattr(tok, "chat_template", None):
            raise errors.BadRequestError("This model has no chat template; use /v1/completions.",
                                         param="messages", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is bad input
            raise errors.BadRequestError(f"Cannot apply the chat template to these messages: {exc}",
                                         param="messages") from None
        return self._tokenize(text, add_special_tokens=False)

    def _chat_logprobs(self, items: list[Any], req: ChatCompletionRequest) -> dict[str, Any] | None:
        if req.requested_logprobs is None:
            return None
        tok = self._tokenizer()
        if self._token_bytes is None or self._token_bytes[0] is not tok:  # once per tokenizer (reload)
            self._token_bytes = (tok, byte_level_token_bytes(tok))
        return chat_logprobs(items, self._decode_token_list, self._token_bytes[1])

    def _completion_logprobs(self, items: list[Any], req: CompletionRequest, offset: int = 0) -> dict[str, Any] | None:
        if req.requested_logprobs is None:
            return None
        return completion_logprobs(items, self._decode_token_list, offset)

    def _decode_token_list(self, ids: list[int]) -> str:
        return self._tokenizer().decode(ids)

    async def _chat_prompt_with_images(self, req: ChatCompletionRequest) -> tuple[list[int], Any]:
        """Image parts (see multimodal.py): decoded and preprocessed off the event loop."""
        if not getattr(self._tokenizer(), "chat_template", None):
            raise errors.BadRequestError("This model has no chat template.", param="messages", code="no_chat_template")
        try:
            return await chat_prompt_with_images(self.state.engine.vision, self._tokenizer(),
                                                 req.messages, self.state.settings.media_limits)
        except MediaError as exc:
            raise errors.BadRequestError(exc.message, param=exc.param, code=exc.code) from None

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        limit = self.state.max_model_len
        if prompt_len >= limit:
            raise errors.BadRequestError(
                f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len} tokens.",
                param="prompt", code="context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise errors.BadRequestError(
                f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len} tokens and "
                f"max_tokens is {requested} ({prompt_len + requested} in total).",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def _sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> Any:
        if self._sampling_cls is None:
            self._sampling_cls = _sampling_params_class()
            self._sampling_fields = _accepted_fields(self._sampling_cls)
        wanted: dict[str, Any] = {"max_tokens": max_tokens, "stop": req.stop_list or None}
        if req.temperature is not None:
            wanted["temperature"] = req.temperature
        if req.top_p is not None:
            wanted["top_p"] = req.top_p
        if req.top_k is not None:
            wanted["top_k"] = req.top_k
        if req.seed is not None:
            wanted["seed"] = req.seed
        if req.requested_logprobs is not None:
            wanted["logprobs"] = req.requested_logprobs
        try:
            grammar = compile_response_format(req.response_format)
        except ResponseFormatError as exc:
            raise errors.BadRequestError(str(exc), param="response_format") from None
        if grammar is not None:
            wanted["grammar"] = grammar
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(req, name) is not None:
                wanted[name] = getattr(req, name)
        for name in ("ignore_eos", "min_tokens"):
            value = getattr(req, name)
            if value:
                if name not in self._sampling_fields:
                    raise errors.BadRequestError(f"{name} is not supported by this engine.", param=name)
                wanted[name] = value
        kwargs = {k: v for k, v in wanted.items() if k in self._sampling_fields}
        try:
            return self._sampling_cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise errors.BadRequestError(f"Invalid sampling parameters: {exc}") from None

    async def _start(self, prompt_ids: list[int], req: CompletionRequest | ChatCompletionRequest,
                     requested_max_tokens: int | None, id_prefix: str, mm: Any = None) -> Generation:
        """Validate lengths, admit the request and start generating; shared by both endpoints."""
        max_tokens = self._max_tokens(requested_max_tokens, len(prompt_ids))
        if req.min_tokens > max_tokens:
            raise errors.BadRequestError("min_tokens must not exceed max_tokens.", param="min_tokens")
        request_id = random_id(id_prefix)
        params = self._sampling_params(req, max_tokens)
        # An engine that takes `stop` matches stop strings itself (and, as vLLM, not before min_tokens
        # tokens); only for one that does not are they matched here.
        stops = [] if "stop" in self._sampling_fields else req.stop_list
        slot = self.state.admit()
        gen = Generation(self, request_id, prompt_ids, params, req.priority, stops, slot, mm)
        await gen.start()
        return gen

    # ---- /v1/completions ----
    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt_ids = self._tokenize(req.prompt)
        gen = await self._start(prompt_ids, req, req.max_tokens, "cmpl")
        if req.stream:
            return self._completion_stream(gen, req)
        texts: list[str] = []
        async for d in gen.deltas():
            texts.append(d.text)
        choice = CompletionChoice(text="".join(texts), finish_reason=gen.finish_reason,
                                  logprobs=self._completion_logprobs(gen.logprobs, req),
                                  token_ids=gen.token_ids if req.return_token_ids else None,
                                  prompt_token_ids=prompt_ids if req.return_token_ids else None)
        return CompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    async def _completion_stream(self, gen: Generation, req: CompletionRequest) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            pending: list[int] = []  # ids of deltas without text yet (e.g. half a UTF-8 character)
            pending_lp: list[Any] = []
            offset = 0
            async for d in gen.deltas():
                pending.extend(d.token_ids)
                pending_lp.extend(d.logprobs or [])
                if not d.text and d.finish_reason is None:
                    continue
                choice = CompletionChoice(text=d.text, finish_reason=d.finish_reason,
                                          logprobs=self._completion_logprobs(pending_lp, req, offset),
                                          token_ids=pending if req.return_token_ids else None)
                offset += len(d.text)
                pending, pending_lp = [], []
                yield _sse(CompletionStreamResponse(id=gen.request_id, created=created, model=self.model_name,
                                                    choices=[choice]))
            if include_usage:
                yield _sse(CompletionStreamResponse(id=gen.request_id, created=created, model=self.model_name,
                                                    choices=[], usage=gen.usage))
        except errors.APIError as exc:
            yield _sse(errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
        finally:
            await gen.close("aborted")  # no-op when it finished; frees the slot if the client went away
        yield SSE_DONE

    # ---- /v1/chat/completions ----
    async def create_chat_completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        mm = None
        if has_images(req.messages):
            prompt_ids, mm = await self._chat_prompt_with_images(req)
        else:
            prompt_ids = self._chat_prompt(req)
        gen = await self._start(prompt_ids, req, req.requested_max_tokens, "chatcmpl", mm)
        if req.stream:
            return self._chat_stream(gen, req)
        texts: list[str] = []
        async for d in gen.deltas():
            texts.append(d.text)
        choice = ChatChoice(message=ChatMessageOut(content="".join(texts)), finish_reason=gen.finish_reason,
                            logprobs=self._chat_logprobs(gen.logprobs, req),
                            token_ids=gen.token_ids if req.return_token_ids else None,
                            prompt_token_ids=prompt_ids if req.return_token_ids else None)
        return ChatCompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    async def _chat_stream(self, gen: Generation, req: ChatCompletionRequest) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(ChatCompletionStreamResponse(id=gen.request_id, created=created, model=self.model_name,
                                                     choices=choices, usage=usage))

        try:
            yield chunk([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
            pending: list[int] = []
            pending_lp: list[Any] = []
            async for d in gen.deltas():
                pending.extend(d.token_ids)
                pending_lp.extend(d.logprobs or [])
                if not d.text and d.finish_reason is None:
                    continue
                yield chunk([ChatStreamChoice(delta=DeltaMessage(content=d.text or None),
                                              finish_reason=d.finish_reason,
                                              logprobs=self._chat_logprobs(pending_lp, req),
                                              token_ids=pending if req.return_token_ids else None)])
                pending, pending_lp = [], []
            if include_usage:
                yield chunk([], gen.usage)
        except errors.APIError as exc:
            yield _sse(errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
        finally:
            await gen.close("aborted")  # no-op when it finished; frees the slot if the client went away
        yield SSE_DONE
