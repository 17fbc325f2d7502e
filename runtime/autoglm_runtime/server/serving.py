"""Serving logic shared by both OpenAI endpoints (vLLM's layout: ``completions.py`` and ``chat.py`` subclass
``OpenAIServing``; ``generation.py`` runs a request and streams it; ``state.py`` is the server's lifecycle).

The HTTP layer (``api.py``) only parses and routes; everything that knows about tokens lives here and
below: tokenization and chat templates (on one worker thread, off the event loop), ``max_tokens``
against ``max_model_len`` (``engine_api.check_lengths``), sampling parameters, usage counts, finish
reasons, per-request metrics. Stop strings are matched by the engine only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from autoglm_runtime.engine_api import InvalidRequestError, check_lengths
from autoglm_runtime.sampling import SamplingParams
from autoglm_runtime.server import errors
from autoglm_runtime.server.generation import Generation
from autoglm_runtime.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, random_id
from autoglm_runtime.server.state import ServerState

T = TypeVar("T")


class OpenAIServing:
    """What both endpoints share: the model card, tokenizing off the loop, sampling parameters,
    priority, lengths and admission (``_start``)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def model_name(self) -> str:
        return self.state.settings.model_name

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
        return await asyncio.get_running_loop().run_in_executor(self.state.tokenizer_thread, fn, *args)

    def _tokenize(self, tok: Any, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)  # token ids: the engine checks them against its vocabulary
        return list(tok(prompt, add_special_tokens=add_special_tokens)["input_ids"])

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
