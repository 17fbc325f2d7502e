"""The engine's admission (event loop side): request intake and validation, the admitted set, cancellation.

A request is checked and tokenized here, sent to the step loop's inbox and admitted once the engine
thread has put it in its scheduler's queue (`add`). Cancelling it at any point, even after the engine
admitted it but before this task resumed, aborts its sequence; aborts go through the inbox too.
"""

from __future__ import annotations

import asyncio

from .engine_api import EngineDeadError, EngineDrainingError, InvalidRequestError, check_lengths
from .engine_loop import ModelInstance, StepLoop
from .engine_output import EngineRequest, RequestStream
from .guided import GuidedDecoder, ResponseFormatError, llg_tokenizer
from .sampling import SamplingParams
from .scheduler import Sequence
from .vision import MultiModalInputs


class Admission:
    """Owns the admitted requests (by id) and ``serving``, the model new requests go to; all on the event loop."""

    def __init__(self, steps: StepLoop, serving: ModelInstance) -> None:
        self.steps = steps
        self.serving = serving
        self.requests = steps.requests
        self.accepting = True

    def new_request(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> EngineRequest:
        """Checks and tokenizes a request for the serving model. Raises the errors of ``add``."""
        if self.steps.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.steps.dead!r}")
        if not self.accepting:
            raise EngineDrainingError("engine is draining and admits no new requests")
        if self.steps.thread is None:
            raise RuntimeError("call Engine.start() first")
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        inst = self.serving
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
        req = EngineRequest(seq, inst, params)
        seq.data = req
        return req

    @staticmethod
    def make_guide(inst: ModelInstance, grammar: str) -> GuidedDecoder:
        try:
            lltok = llg_tokenizer(inst.loaded.tokenizer, inst.runner.vocab_size, inst.loaded.eos_token_ids)
            return GuidedDecoder(lltok, grammar)
        except ResponseFormatError as exc:
            raise InvalidRequestError(f"response_format cannot be enforced: {exc}", param="response_format") from None

    async def add(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int = 0,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """See ``Engine.add_request``."""
        req = self.new_request(request_id, prompt, params, priority, mm, cache_salt)
        if params.grammar is not None:
            # response_format: the grammar's matcher is made now (off the event loop: the first one of a
            # model builds its llguidance tokenizer), so the engine thread cannot fail on it later.
            req.sampling.guide = await asyncio.to_thread(self.make_guide, req.instance, params.grammar)
            if not self.accepting:  # drain()/stop() began meanwhile
                raise EngineDrainingError("engine is draining and admits no new requests")
        admitted = asyncio.get_running_loop().create_future()
        self.requests[request_id] = req
        self.steps.send(("add", req, admitted))
        try:
            while not admitted.done():
                await asyncio.wait({admitted}, timeout=0.5)
                if not admitted.done() and not self.steps.running():  # died (or stopped) before it got there
                    admitted.set_exception(EngineDeadError(f"engine loop died: {self.steps.dead!r}"))
            admitted.result()
        except BaseException:
            # Cancelled while queued, or after the engine admitted it (the answer was set but this task
            # was cancelled before it resumed): either way the sequence must not run on unread.
            if not admitted.done() or admitted.cancelled() or admitted.exception() is None:
                self.steps.send(("abort", req, None))
            self.forget(req)
            raise
        return RequestStream(req, self.abort_and_wait, self.forget)

    def forget(self, req: EngineRequest) -> None:
        if self.requests.get(req.seq.request_id) is req:
            del self.requests[req.seq.request_id]

    def abort(self, request_id: str) -> None:
        """See ``Engine.abort``."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if self.steps.running():
            self.steps.send(("abort", req, None))
        else:
            self.steps.abort_now(req)

    async def abort_and_wait(self, req: EngineRequest) -> None:
        """Aborts and returns once the engine has freed the request's slot."""
        if not self.steps.running():
            self.steps.abort_now(req)
            return
        done = asyncio.get_running_loop().create_future()
        self.steps.send(("abort", req, done))
        while not done.done():
            await asyncio.wait({done}, timeout=0.5)
            if not done.done() and not self.steps.running():  # the thread ended before it got there
                self.steps.abort_now(req)
                return

    async def drain(self, timeout: float) -> bool:
        """See ``Engine.drain``."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.requests and self.steps.running():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return not self.requests
