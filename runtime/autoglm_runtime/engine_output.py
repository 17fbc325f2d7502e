"""The engine's output plumbing: per-request state and streams, detokenizing, stop strings, logprobs, delivery.

Everything here runs on the engine thread except `RequestStream` (the event loop's side) and
`Outbox.dispatch`, which the event loop runs for every batch of outputs a step produces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from .engine_api import FinishReason as OutputFinishReason
from .engine_api import QueuedStream, RequestOutput
from .logprobs import TokenLogprob
from .sampling import IncrementalDetokenizer, SamplingParams, SamplingState
from .scheduler import FinishReason, Scheduler, SchedulerOutput, Sequence


class EngineRequest:
    """One admitted request: its scheduler sequence, output queue, detokenizer and sampling state."""

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

    def __init__(self, seq: Sequence, instance: Any, params: SamplingParams) -> None:
        self.seq = seq
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detok = IncrementalDetokenizer(instance.backend_tokenizer, params.stop)
        self.sampling = SamplingState(params, instance.loaded.device)
        self.instance = instance  # engine_loop.ModelInstance: the model that serves it
        self.first_token_time: float | None = None
        self.final_sent = False
        self.emitted_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []


class RequestStream(QueuedStream):
    """The outputs of one admitted request (``EngineClient.add_request``'s answer)."""

    def __init__(
        self,
        req: EngineRequest,
        abort_and_wait: Callable[[EngineRequest], Awaitable[None]],
        forget: Callable[[EngineRequest], None],
    ) -> None:
        super().__init__(req.seq.request_id, req.queue)
        self._req = req
        self._abort_and_wait = abort_and_wait
        self._forget = forget
        self._closed = False

    async def aclose(self) -> None:
        """Aborts the request if it has not finished and returns once its slot is free."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._req.final_sent:
                await self._abort_and_wait(self._req)
        finally:
            self._forget(self._req)


def make_output(req: EngineRequest, new_ids: list[int], text: str, finished: bool, now: float) -> RequestOutput:
    """The RequestOutput for ``new_ids`` of ``req`` (its pending logprobs taken along)."""
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


def abort_output(req: EngineRequest) -> RequestOutput:
    """The final output of a request aborted now (its sequence already finished with "abort")."""
    return make_output(req, [], "", finished=True, now=time.monotonic())


def step_outputs(
    sched: Scheduler,
    out: SchedulerOutput,
    tokens: list[int],
    logprobs: dict[int, TokenLogprob] | None,
) -> tuple[list[Sequence], list[tuple[EngineRequest, object]]]:
    """Applies one step's sampled ``tokens`` to the scheduler, detokenizes, applies stop strings and
    response_format completion; returns the sequences that got a token and the outputs to deliver."""
    if logprobs:
        for row, seq in enumerate(out.sampled_sequences):
            if row in logprobs and not seq.is_finished:
                seq.data.pending_logprobs.append(logprobs[row])
    updated = sched.update_from_output(out, tokens)
    now = time.monotonic()
    items: list[tuple[EngineRequest, object]] = []
    stop_hits = []
    texts = []
    for seq in updated:
        req: EngineRequest = seq.data
        if req.first_token_time is None:
            req.first_token_time = now
        # Stop strings count only after min_tokens tokens (vLLM's rule).
        check_stop = len(seq.output_token_ids) > req.sampling.params.min_tokens
        guide_done = False
        guide = req.sampling.guide
        if guide is not None and not seq.is_finished:
            guide.consume(seq.output_token_ids[-1])
            guide_done = guide.done  # the response_format grammar is complete: stop here
        texts.append(req.detok.step(seq.output_token_ids, final=seq.is_finished or guide_done, check_stop=check_stop))
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
        items.append((req, make_output(req, new_ids, text, seq.is_finished, now)))
    return updated, items


def resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    """Answers an admission or abort future (run on the event loop)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class Outbox:
    """Hands results from the engine thread to the event loop (``call_soon_threadsafe``)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # set by Engine.start()

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Runs ``fn(*args)`` on the event loop: now when called from it, else soon."""
        loop = self.loop
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

    def answer(self, fut: asyncio.Future, exc: BaseException | None) -> None:
        self.call(resolve, fut, exc)

    def deliver(self, items: list[tuple[EngineRequest, object]]) -> None:
        self.call(self.dispatch, items)

    @staticmethod
    def dispatch(items: list[tuple[EngineRequest, object]]) -> None:
        for req, item in items:
            if req.final_sent:
                continue
            if isinstance(item, BaseException) or item.finished:  # type: ignore[attr-defined]
                req.final_sent = True
            req.queue.put_nowait(item)
