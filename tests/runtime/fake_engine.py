"""A fake engine for the in-process server tier: no model, no threads, no sleeps.

It implements ``engine_api.EngineClient``. The test decides everything: whether admission succeeds
(``refuse``, ``capacity``, ``hold_admission``), and what each admitted request outputs and when
(``emit``; or ``auto_tokens`` for requests that simply finish at once).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from autoglm_runtime.engine_api import EngineDeadError, EngineStats, QueuedStream, QueueFullError, RequestOutput


class FakeTokenizer:
    """One token per character (ids 1..999); refuses strings that are not valid Unicode like the real one."""

    chat_template = "fake"
    vocab_size = 1000

    def __init__(self) -> None:
        self.calls = 0  # prompts tokenized
        self.decode_threads: set[str] = set()  # names of the threads that called decode()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if not isinstance(text, str):
            raise TypeError("TextEncodeInput must be a str")
        self.calls += 1
        text.encode("utf-8")  # a lone surrogate raises here, as it does in `tokenizers`
        return {"input_ids": [ord(c) % 999 + 1 for c in text]}

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tokenize: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids: list[int]) -> str:
        self.decode_threads.add(threading.current_thread().name)
        return "".join(chr(i - 1) for i in ids)  # the inverse of __call__ for ASCII

    def __len__(self) -> int:
        return self.vocab_size


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any
    priority: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    aborted: bool = False
    sent_tokens: int = 0


class FakeStream(QueuedStream):
    def __init__(self, engine: FakeEngine, req: FakeRequest) -> None:
        super().__init__(req.request_id, req.queue)
        self.engine = engine
        self.req = req

    async def aclose(self) -> None:
        if not self.req.finished:
            self.req.finished = self.req.aborted = True
            self.engine.aborted.append(self.request_id)
        self.engine.active.pop(self.request_id, None)
        self.engine.changed.set()


class FakeEngine:
    max_model_len = 64
    vision = None  # a text-only model

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.active: dict[str, FakeRequest] = {}
        self.requests: list[FakeRequest] = []
        self.aborted: list[str] = []
        self.changed = asyncio.Event()  # set whenever a request is admitted or leaves
        self.refuse: BaseException | None = None
        self.capacity: int | None = None  # admitted requests at most; more get QueueFullError
        self.auto_tokens: int | None = None  # finish every request at once with this many tokens
        self.hold_admission: asyncio.Event | None = None  # admission waits for it when set
        self.healthy = True
        self.reloads: list[tuple[Any, str]] = []
        self.admitting = 0  # calls of add_request so far (held ones included)

    # ---- what tests call ----
    async def wait_for(self, predicate: Any) -> None:
        """Waits (no polling) until ``predicate()`` holds after some admission or departure."""
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    def emit(self, request_id: str, text: str, *, finished: bool = False, reason: str | None = None,
             ids: list[int] | None = None, logprobs: list[Any] | None = None) -> None:
        """``ids``: the new token ids (default: one per character of ``text``); ``logprobs``: one
        ``logprobs.TokenLogprob`` per id when the request asked for them."""
        req = self.active[request_id]
        ids = [ord(c) % 999 + 1 for c in text] if ids is None else ids
        req.sent_tokens += len(ids)
        if finished:
            req.finished = True
            self.active.pop(request_id, None)
        req.queue.put_nowait(RequestOutput(request_id, ids, text, finished, (reason or "length") if finished else None,
                                           len(req.prompt_token_ids), req.sent_tokens, 0.0, logprobs=logprobs))

    def fail(self, request_id: str, exc: BaseException) -> None:
        self.active[request_id].queue.put_nowait(exc)

    def only(self) -> FakeRequest:
        (req,) = self.active.values()
        return req

    # ---- EngineClient ----
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any,
                          priority: int = 0, mm: Any = None, cache_salt: str | None = None) -> FakeStream:
        self.admitting += 1
        self.changed.set()
        if self.hold_admission is not None:
            await self.hold_admission.wait()
        if self.refuse is not None:
            raise self.refuse
        if self.capacity is not None and len(self.active) >= self.capacity:
            raise QueueFullError("queue is full")
        req = FakeRequest(request_id, list(prompt_token_ids), params, priority)
        self.active[request_id] = req
        self.requests.append(req)
        self.changed.set()
        if self.auto_tokens is not None:
            self.emit(request_id, "x" * self.auto_tokens, finished=True)
        return FakeStream(self, req)

    def check_health(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        if not self.healthy:
            raise EngineDeadError("dead")
        return EngineStats(num_running=len(self.active), num_waiting=0, kv_cache_usage=0.0, slot_usage=0.0,
                           max_batch_size=8, max_queue=8, num_steps=0, prompt_tokens_total=0,
                           generation_tokens_total=0, healthy=True, accepting=True, num_models=1)

    async def start(self) -> None:
        pass

    async def reload(self, model_dir: Any, revision: str = "") -> None:
        self.reloads.append((model_dir, revision))

    async def drain(self, timeout: float) -> bool:
        return not self.active

    async def stop(self) -> None:
        pass
