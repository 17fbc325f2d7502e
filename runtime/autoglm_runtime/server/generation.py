"""One request in the engine (``Generation``) and the one SSE loop both endpoints stream with."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from autoglm_runtime.engine_api import (
    EngineDrainingError,
    EngineError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestStream,
)
from autoglm_runtime.metrics import RequestTimer
from autoglm_runtime.sampling import SamplingParams
from autoglm_runtime.server import errors
from autoglm_runtime.server.protocol import PromptTokensDetails, UsageInfo
from autoglm_runtime.server.state import ServerState, Slot

T = TypeVar("T")


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[Any] | None = None  # logprobs.TokenLogprob per token id, when the request asked


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
        slot: Slot,
        mm: Any = None,
        cache_salt: str | None = None,
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.slot = slot
        self.mm = mm  # the prompt's images (vision.MultiModalInputs) for a vision-language engine
        self.cache_salt = cache_salt
        self.cached_tokens = 0  # prompt tokens the engine took from its prefix cache
        self.arrival = time.monotonic()
        self.timer = RequestTimer(state.metrics, self.arrival)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[Any] = []  # every TokenLogprob so far (when the request asked)
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
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
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
                self.state.engine.add_request(
                    self.request_id, self.prompt_ids, self.params, self.priority, mm=self.mm, cache_salt=self.cache_salt
                )
            )
        except EngineError as exc:
            await self.close(_status_of(exc))
            raise errors.from_engine(exc) from None
        except errors.RequestTimeoutError:  # the server's deadline, not the client's choice: a failure
            await self.close("timeout")
            raise
        except BaseException:  # cancellation (client gone) or a bug
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
                self.cached_tokens = out.num_cached_tokens
                lps = out.logprobs
                self.logprobs.extend(lps or [])
                self.timer.tokens(time.monotonic(), len(ids))
                self.completion_tokens += len(ids)
                self.token_ids.extend(ids)
                if out.finished:
                    self.finish_reason = out.finish_reason or "stop"
                    status = "aborted" if self.finish_reason == "abort" else "success"
                    yield Delta(out.new_text, ids, self.finish_reason, lps)
                    return
                if out.new_text or ids:
                    yield Delta(out.new_text, ids, None, lps)
        except EngineError as exc:
            status = _status_of(exc)
            raise errors.from_engine(exc) from None
        except errors.RequestTimeoutError:
            status = "timeout"
            raise
        except BaseException:  # cancellation (client gone), consumer left (GeneratorExit)
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


def sse(obj: Any) -> str:
    payload = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclasses.dataclass
class EventStream:
    """A started generation as server-sent events. ``close`` must run however the response ends (even if
    the body is never iterated: a client gone before the first chunk); ``api.py`` guarantees it."""

    body: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


async def stream_events(
    gen: Generation,
    first: list[str],
    chunk: Callable[[Delta, list[int], list[Any]], Awaitable[str]],
    usage_chunk: Callable[[], str] | None,
) -> AsyncIterator[str]:
    """The one SSE loop: ``first`` chunks, one chunk per delta with text or a finish reason (token ids and
    logprobs of text-less deltas ride on the next one), an optional usage chunk, an error event for an API
    error, then ``[DONE]``."""
    try:
        for c in first:
            yield c
        pending: list[int] = []  # ids of deltas without text yet (e.g. half a UTF-8 character)
        pending_lp: list[Any] = []  # ... and their logprobs (when the request asked)
        async for d in gen.deltas():
            pending.extend(d.token_ids)
            pending_lp.extend(d.logprobs or [])
            if not d.text and d.finish_reason is None:
                continue
            yield await chunk(d, pending, pending_lp)
            pending, pending_lp = [], []
        if usage_chunk is not None:
            yield usage_chunk()
    except errors.APIError as exc:
        yield sse(errors.error_body(exc.message, exc.error_type, exc.param, exc.code))
    yield SSE_DONE
