"""What the HTTP layer knows about the engine: a typed client interface, its outputs and its errors.

Torch-free, so the server (and its fake-engine tests) import it without loading a model. The engine
(``autoglm_runtime.engine.Engine``) implements ``EngineClient``; ``server/errors.py`` maps every
``EngineError`` to an HTTP status in one place.

    stream = await engine.add_request(request_id, prompt_token_ids, params, priority=0, mm=None, cache_salt=None)
    # mm: the images of the prompt (vision.MultiModalInputs) for a vision-language model
    # cache_salt: the prompt's KV prefix is shared only with requests of the same salt
    # returns once the request is ADMITTED (in the engine's queue), before any token; raises
    # QueueFullError / InvalidRequestError / EngineDrainingError / EngineDeadError otherwise.
    async for out in stream:      # RequestOutput, the last one has finished=True
        ...
    await stream.aclose()         # aborts it if unfinished and frees its slot (idempotent)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "EngineClient",
    "EngineDeadError",
    "EngineDrainingError",
    "EngineError",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "QueueFullError",
    "RequestOutput",
    "RequestStream",
    "check_lengths",
]


class EngineError(Exception):
    """Base of the errors the engine documents; anything else from it is a bug."""


class QueueFullError(EngineError, RuntimeError):
    """The waiting queue is at ``max_queue``; the caller should answer 429 and retry later."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine's step loop has died; the process should be restarted."""


class EngineDrainingError(EngineError, RuntimeError):
    """The engine is draining or stopped and admits no new requests."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as given (empty or too long prompt, unknown token ids, duplicate id).

    ``param`` and ``code`` say which field is wrong, as OpenAI's error body does."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_lengths(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """THE length rule (the server and the engine both call it): the prompt leaves room for one token, and
    prompt + ``max_tokens`` fits in ``max_model_len``. Returns the effective ``max_tokens`` (all the room
    left when None). Raises ``InvalidRequestError``."""
    if prompt_len < 1:
        raise InvalidRequestError("The prompt is empty.", param="prompt")
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} tokens "
            f"and max_tokens is {max_tokens} ({prompt_len + max_tokens} in total).",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None  # set when finished
    prompt_tokens: int
    completion_tokens: int
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    logprobs: list[Any] | None = None  # logprobs.TokenLogprob per new token, when the request asked (params.logprobs)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, fraction of the KV blocks held by sequences
    slot_usage: float  # 0..1, running / max_batch_size
    max_batch_size: int
    max_queue: int
    num_steps: int
    prompt_tokens_total: int
    generation_tokens_total: int
    healthy: bool
    accepting: bool
    num_models: int  # > 1 while an old model drains after reload()
    kv_blocks_used: int = 0  # KV blocks held by sequences
    kv_blocks_total: int = 0  # KV blocks of the pool
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (since start)
    prefix_cache_hits: int = 0  # ... of which found there
    num_preemptions: int = 0  # sequences sent back to the queue for lack of KV blocks (since start)


class RequestStream(Protocol):
    """The outputs of one admitted request."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...
    async def __anext__(self) -> RequestOutput: ...
    async def aclose(self) -> None: ...


class QueuedStream:
    """A ``RequestStream`` over an ``asyncio.Queue`` of outputs: each item is a ``RequestOutput`` (the
    last one ``finished``) or the exception that ended the request. Engines subclass it for ``aclose``."""

    def __init__(self, request_id: str, queue: asyncio.Queue[Any]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._done = False

    def __aiter__(self) -> QueuedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        raise NotImplementedError


class EngineClient(Protocol):
    """What the HTTP layer needs from the engine."""

    @property
    def tokenizer(self) -> Any: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def vision(self) -> Any: ...  # vision.VisionLanguage of a vision-language model, None for a text-only one

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Any,
        priority: int = 0,
        mm: Any = None,
        cache_salt: str | None = None,
    ) -> RequestStream: ...
    def check_health(self) -> bool: ...
    def stats(self) -> EngineStats: ...
    async def start(self) -> None: ...
    async def reload(self, model_dir: str | Path, revision: str = "") -> None: ...
    async def drain(self, timeout: float) -> bool: ...
    async def stop(self) -> None: ...
