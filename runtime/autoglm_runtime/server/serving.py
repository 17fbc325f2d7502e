"""Serving logic: OpenAI requests in, engine calls out.

The HTTP layer (``api.py``) only parses and routes; everything that knows about tokens lives here:
tokenization and chat templates (on one worker thread, off the event loop), ``max_tokens`` against
``max_model_len`` (``engine_api.check_lengths``), sampling parameters, usage counts, finish reasons,
metrics per request, one SSE streaming function for both endpoints, and the server's lifecycle state
(readiness, draining, in-flight requests, hot reload). Stop strings are matched by the engine only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from autoglm_runtime.config import RuntimeSettings
from autoglm_runtime.engine_api import (
    EngineClient,
    EngineDrainingError,
    EngineError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestStream,
    check_lengths,
)
from autoglm_runtime.loader import ModelLoadError
from autoglm_runtime.metrics import RequestTimer, RuntimeMetrics
from autoglm_runtime.sampling import SamplingParams
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

T = TypeVar("T")

# ------------------------------------------------------------------ server state


class ServerState:
    """Lifecycle of one server: readiness, draining, in-flight requests, hot reload."""

    def __init__(
        self, settings: RuntimeSettings, engine: EngineClient, metrics: RuntimeMetrics, max_model_len: int
    ) -> None:
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
    def admit(self) -> _Slot:
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
        except TimeoutError:
            log.warning("Drain timed out, in_flight=%d", self.inflight)
            return False
        try:
            await asyncio.wait_for(
                self.engine.drain(max(0.0, deadline - time.monotonic())), timeout=max(0.1, deadline - time.monotonic())
            )
        except TimeoutError:
            return False
        log.info("Drained all requests")
        return True

    # ---- hot reload ----
    def _allowed_model_dir(self, model: str) -> Path:
        root = self.settings.reload_root
        assert root is not None  # settings default it to the model's parent
        model_dir = Path(model).resolve()
        if not model_dir.is_relative_to(root.resolve()):
            raise errors.PermissionDeniedError(
                f"Reload accepts only model folders under {root}.", param="model", code="model_not_allowed"
            )
        return model_dir

    async def reload(self, model: str | None = None, revision: str | None = None) -> dict[str, Any]:
        """Loads ``model`` (a folder under ``--reload-root``; default: the current one) next to the serving
        model. Raises APIError: 403 outside the root, 400 not loadable, 409 not enough memory for both."""
        if self.draining:
            raise errors.DrainingError()
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            model_dir = self._allowed_model_dir(model) if model else self.settings.model
            if not model_dir.is_dir():
                raise errors.BadRequestError(
                    f"Model directory {model_dir} does not exist.", param="model", code="model_not_found"
                )
            started = time.monotonic()
            log.info("Started hot reload, model=%s", model_dir)
            try:
                await self.engine.reload(model_dir, revision=revision or self.metrics.revision)
            except ModelLoadError as exc:
                self.metrics.reloads_total.labels(*self.metrics.labels, "error").inc()
                log.error("Failed hot reload, model=%s error=%s", model_dir, exc)
                raise errors.from_engine(exc) from None
            self.settings.model = model_dir
            self.max_model_len = self.engine.max_model_len
            self.metrics.set_labels(revision=revision)
            self.metrics.reloads_total.labels(*self.metrics.labels, "success").inc()
            seconds = time.monotonic() - started
            log.info("Finished hot reload, model=%s seconds=%.2f", model_dir, seconds)
            return {
                "status": "reloaded",
                "model": str(model_dir),
                "revision": self.metrics.revision,
                "seconds": round(seconds, 3),
            }


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


# ------------------------------------------------------------------ generation


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


def _status_of(exc: EngineError) -> str:
    if isinstance(exc, (QueueFullError, EngineDrainingError)):
        return "rejected"
    if isinstance(exc, InvalidRequestError):
        return "invalid"
    return "error"


class Generation:
    """One request in the engine. ``start()`` returns once the engine admitted it (so a 429 comes before a
    stream starts, and a stream's headers go out while it is still queued); ``deltas()`` then yields its
    output. ``close()`` (idempotent) aborts it if unfinished, frees its slot and counts it."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int,
        slot: _Slot,
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.slot = slot
        self.arrival = time.monotonic()
        self.timer = RequestTimer(state.metrics, self.arrival)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._stream: RequestStream | None = None
        self._closed = False
        timeout = state.settings.request_timeout_seconds
        self.deadline = self.arrival + timeout if timeout else None

    @property
    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
            total_tokens=len(self.prompt_ids) + self.completion_tokens,
        )

    async def _within_deadline(self, work: Awaitable[T]) -> T:
        if self.deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise errors.RequestTimeoutError(
                f"The request ran longer than {self.state.settings.request_timeout_seconds}s."
            ) from None

    async def start(self) -> None:
        try:
            self._stream = await self._within_deadline(
                self.state.engine.add_request(self.request_id, self.prompt_ids, self.params, self.priority)
            )
        except EngineError as exc:
            await self.close(_status_of(exc))
            raise errors.from_engine(exc) from None
        except BaseException:  # timeout, cancellation (client gone) or a bug
            await self.close("aborted")
            raise

    async def deltas(self) -> AsyncIterator[Delta]:
        """Yields deltas until finished; the last one carries the finish reason."""
        assert self._stream is not None, "start() first"
        status = "error"
        try:
            while True:
                try:
                    out = await self._within_deadline(self._stream.__anext__())
                except StopAsyncIteration:  # ended without a finished output
                    self.finish_reason, status = "abort", "aborted"
                    yield Delta("", [], "abort")
                    return
                ids = list(out.new_token_ids)
                self.timer.tokens(time.monotonic(), len(ids))
                self.completion_tokens += len(ids)
                self.token_ids.extend(ids)
                if out.finished:
                    self.finish_reason = out.finish_reason or "stop"
                    status = "aborted" if self.finish_reason == "abort" else "success"
                    yield Delta(out.new_text, ids, self.finish_reason)
                    return
                if out.new_text or ids:
                    yield Delta(out.new_text, ids, None)
        except EngineError as exc:
            status = _status_of(exc)
            raise errors.from_engine(exc) from None
        except BaseException:  # timeout, cancellation (client gone), consumer left (GeneratorExit)
            status = "aborted"
            raise
        finally:
            await self.close(status)

    async def close(self, status: str = "aborted") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._stream is not None:
                await self._stream.aclose()  # aborts it when unfinished; returns once its slot is free
        finally:
            if status == "rejected":
                self.state.metrics.request_finished("rejected")
            else:
                self.timer.done(time.monotonic(), len(self.prompt_ids), self.completion_tokens, status)
            self.slot.release()


# ------------------------------------------------------------------ streaming (both endpoints)


def _sse(obj: Any) -> str:
    payload = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclasses.dataclass
class EventStream:
    """A started generation as server-sent events. ``close`` must run however the response ends (even if
    the body is never iterated: a client gone before the first chunk); ``api.py`` guarantees it."""

    body: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


async def _stream_events(
    gen: Generation, first: list[str], chunk: Callable[[Delta, list[int]], str], usage_chunk: Callable[[], str] | None
) -> AsyncIterator[str]:
    """The one SSE loop: ``first`` chunks, one chunk per delta with text or a finish reason (token ids of
    text-less deltas ride on the next one), an optional usage chunk, an error event for an API error,
    then ``[DONE]``."""
    try:
        for c in first:
            yield c
        pending: list[int] = []  # ids of deltas without text yet (e.g. half a UTF-8 character)
        async for d in gen.deltas():
            pending.extend(d.token_ids)
            if not d.text and d.finish_reason is None:
                continue
            yield chunk(d, pending)
            pending = []
        if usage_chunk is not None:
            yield usage_chunk()
    except errors.APIError as exc:
        yield _sse(errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
    yield SSE_DONE


# ------------------------------------------------------------------ OpenAI serving


class OpenAIServing:
    """Completions and chat completions on top of one engine."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        # Tokenizers are not safe to call from several threads at once; one worker keeps them off the loop.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoglm-tokenize")

    @property
    def model_name(self) -> str:
        return self.state.settings.model_name

    def shutdown(self) -> None:
        self._cpu.shutdown(wait=False, cancel_futures=True)

    # ---- shared steps ----
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise errors.ModelNotFoundError(model, self.model_name)

    def models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=self.model_name, root=str(self.state.settings.model), max_model_len=self.state.max_model_len
                )
            ]
        )

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    def _tokenize(self, tok: Any, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)  # token ids: the engine checks them against its vocabulary
        return list(tok(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def _chat_tokens(self, tok: Any, messages: list[dict[str, Any]]) -> list[int]:
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is bad input
            raise errors.BadRequestError(
                f"Cannot apply the chat template to these messages: {exc}", param="messages"
            ) from None
        return self._tokenize(tok, text, add_special_tokens=False)

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.state.engine.tokenizer
        try:
            messages = [m.to_template() for m in req.messages]
        except ValueError as exc:  # to_template's own refusal of a content part
            raise errors.BadRequestError(str(exc), param="messages") from None
        if not getattr(tok, "chat_template", None):
            raise errors.BadRequestError(
                "This model has no chat template; use /v1/completions.", param="messages", code="no_chat_template"
            )
        return await self._off_loop(self._chat_tokens, tok, messages)

    def _sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        if req.min_tokens > max_tokens:
            raise errors.BadRequestError("min_tokens must not exceed max_tokens.", param="min_tokens")
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": req.stop_list,
            "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens,
        }
        for name in ("temperature", "top_p", "top_k", "seed"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        return SamplingParams(**kwargs)  # the protocol's ranges are within SamplingParams'

    def _priority(self, req: CompletionRequest | ChatCompletionRequest) -> int:
        if req.priority and not self.state.settings.allow_client_priority:
            raise errors.BadRequestError(
                "priority is not enabled on this server (--allow-client-priority).",
                param="priority",
                code="priority_not_allowed",
            )
        return req.priority

    async def _start(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        prompt: Callable[[], Awaitable[list[int]]],
        requested_max_tokens: int | None,
        id_prefix: str,
    ) -> Generation:
        """Count the request in flight (so a drain that starts now waits for it), tokenize (``prompt``),
        validate lengths, and start it in the engine; shared by both endpoints."""
        self.check_model(req.model)
        priority = self._priority(req)
        slot = self.state.admit()
        try:
            prompt_ids = await prompt()
            try:
                max_tokens = check_lengths(len(prompt_ids), requested_max_tokens, self.state.max_model_len)
            except InvalidRequestError as exc:
                raise errors.from_engine(exc) from None
            params = self._sampling_params(req, max_tokens)
            gen = Generation(self.state, random_id(id_prefix), prompt_ids, params, priority, slot)
        except BaseException:
            slot.release()
            raise
        await gen.start()  # closes itself (and releases the slot) when it fails
        return gen

    async def _collect(self, gen: Generation) -> str:
        texts = [d.text async for d in gen.deltas()]
        return "".join(texts)

    # ---- /v1/completions ----
    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | EventStream:
        gen = await self._start(
            req,
            lambda: self._off_loop(self._tokenize, self.state.engine.tokenizer, req.prompt),
            req.max_tokens,
            "cmpl",
        )
        prompt_ids = gen.prompt_ids
        if req.stream:
            return self._completion_stream(gen, req)
        try:
            text = await self._collect(gen)
        finally:
            await gen.close()
        choice = CompletionChoice(
            text=text,
            finish_reason=gen.finish_reason,
            token_ids=gen.token_ids if req.return_token_ids else None,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        )
        return CompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    def _completion_stream(self, gen: Generation, req: CompletionRequest) -> EventStream:
        created = int(time.time())

        def chunk(d: Delta, ids: list[int]) -> str:
            choice = CompletionChoice(
                text=d.text, finish_reason=d.finish_reason, token_ids=ids if req.return_token_ids else None
            )
            return _sse(
                CompletionStreamResponse(id=gen.request_id, created=created, model=self.model_name, choices=[choice])
            )

        def usage() -> str:
            return _sse(
                CompletionStreamResponse(
                    id=gen.request_id, created=created, model=self.model_name, choices=[], usage=gen.usage
                )
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(_stream_events(gen, [], chunk, usage if include_usage else None), gen.close)

    # ---- /v1/chat/completions ----
    async def create_chat_completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        gen = await self._start(req, lambda: self._chat_prompt(req), req.requested_max_tokens, "chatcmpl")
        prompt_ids = gen.prompt_ids
        if req.stream:
            return self._chat_stream(gen, req)
        try:
            text = await self._collect(gen)
        finally:
            await gen.close()
        choice = ChatChoice(
            message=ChatMessageOut(content=text),
            finish_reason=gen.finish_reason,
            token_ids=gen.token_ids if req.return_token_ids else None,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        )
        return ChatCompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    def _chat_stream(self, gen: Generation, req: ChatCompletionRequest) -> EventStream:
        created = int(time.time())

        def sse(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(
                ChatCompletionStreamResponse(
                    id=gen.request_id, created=created, model=self.model_name, choices=choices, usage=usage
                )
            )

        def chunk(d: Delta, ids: list[int]) -> str:
            return sse(
                [
                    ChatStreamChoice(
                        delta=DeltaMessage(content=d.text or None),
                        finish_reason=d.finish_reason,
                        token_ids=ids if req.return_token_ids else None,
                    )
                ]
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = [sse([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])]
        return EventStream(
            _stream_events(gen, first, chunk, (lambda: sse([], gen.usage)) if include_usage else None), gen.close
        )
