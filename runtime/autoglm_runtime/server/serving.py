"""Serving logic shared by both OpenAI endpoints (vLLM's layout: ``completions.py`` and ``chat.py`` subclass
``OpenAIServing``; ``generation.py`` runs a request and streams it; ``state.py`` is the server's lifecycle).

The HTTP layer (``api.py``) only parses and routes; everything that knows about tokens lives here and
below: tokenization and chat templates (on one worker thread, off the event loop), ``max_tokens``
against ``max_model_len`` (``engine_api.check_lengths``), sampling parameters, usage counts, finish
reasons, per-request metrics, and the OpenAI shape of logprobs. Stop strings are matched by the engine
only; a chat prompt with images becomes a ``Prompt`` with the images' ``MultiModalInputs`` (``chat.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from autoglm_runtime.engine_api import InvalidRequestError, check_lengths
from autoglm_runtime.guided import ResponseFormatError, compile_response_format
from autoglm_runtime.logprobs import chat_logprobs, completion_logprobs
from autoglm_runtime.sampling import SamplingParams, byte_level_token_bytes
from autoglm_runtime.server import errors
from autoglm_runtime.server.admission import mark_queued
from autoglm_runtime.server.generation import Generation
from autoglm_runtime.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, random_id
from autoglm_runtime.server.state import ServerState

T = TypeVar("T")


@dataclasses.dataclass
class Prompt:
    """A tokenized prompt and, for a chat request with images, its ``vision.MultiModalInputs``."""

    token_ids: list[int]
    mm: Any = None


class OpenAIServing:
    """What both endpoints share: the model card, tokenizing off the loop, sampling parameters,
    priority, lengths and admission (``_start``)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._token_bytes: tuple[Any, list[bytes] | None] | None = None  # (tokenizer, raw bytes per token id)

    @property
    def model_name(self) -> str:
        return self.state.settings.model_name

    # ---- shared steps ----
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise errors.ModelNotFoundError(model, self.model_name)

    def models(self) -> ModelList:
        self.state.engine  # noqa: B018 - 503 until the model is loaded (max_model_len is not known before)
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
        for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if req.repetition_penalty is not None:
            kwargs["repetition_penalty"] = req.repetition_penalty
        if req.requested_logprobs is not None:
            kwargs["logprobs"] = req.requested_logprobs
        try:
            kwargs["grammar"] = compile_response_format(req.response_format)
        except ResponseFormatError as exc:
            raise errors.BadRequestError(str(exc), param="response_format") from None
        try:
            return SamplingParams(**kwargs)  # the protocol's ranges are within SamplingParams'
        except ValueError as exc:  # ... so this is a safety net: bad input is a 400, never a 500
            raise errors.BadRequestError(f"Invalid sampling parameters: {exc}") from None

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
        prompt: Callable[[], Awaitable[list[int] | Prompt]],
        requested_max_tokens: int | None,
        id_prefix: str,
    ) -> Generation:
        """Count the request in flight (so a drain that starts now waits for it), tokenize (``prompt``),
        validate lengths, and start it in the engine; shared by both endpoints."""
        self.check_model(req.model)
        priority = self._priority(req)
        slot = self.state.admit()
        try:
            got = await prompt()
            prompt_ids, mm = (got.token_ids, got.mm) if isinstance(got, Prompt) else (got, None)
            try:
                max_tokens = check_lengths(len(prompt_ids), requested_max_tokens, self.state.max_model_len)
            except InvalidRequestError as exc:
                # Counted like the engine's own refusals: a revision whose max_model_len is too small for
                # its traffic shows in autoglm_requests_total{status="invalid"}, not nowhere.
                self.state.metrics.request_finished("invalid")
                raise errors.from_engine(exc) from None
            params = self._sampling_params(req, max_tokens)
            gen = Generation(
                self.state, random_id(id_prefix), prompt_ids, params, priority, slot, mm, cache_salt=req.cache_salt
            )
        except BaseException:
            slot.release()
            raise
        await gen.start()  # closes itself (and releases the slot) when it fails
        mark_queued()  # in the engine's queue now: no longer pending work of the server (admission.py)
        return gen

    async def _collect(self, gen: Generation) -> str:
        texts = [d.text async for d in gen.deltas()]
        return "".join(texts)

    # ---- logprobs (OpenAI's shapes; see logprobs.py) ----
    def _decode_token_list(self, ids: list[int]) -> str:
        return self.state.engine.tokenizer.decode(ids)

    async def _load_token_bytes(self) -> None:
        """The raw bytes of every token id (chat logprobs' ``bytes``), made once per tokenizer (a reload
        brings a new one) on the tokenizer thread: it decodes the whole vocabulary."""
        tok = self.state.engine.tokenizer
        if self._token_bytes is None or self._token_bytes[0] is not tok:
            self._token_bytes = (tok, await self._off_loop(byte_level_token_bytes, tok))

    async def _chat_logprobs(self, items: list[Any], req: ChatCompletionRequest) -> dict[str, Any] | None:
        """Detokenized on the tokenizer thread: a long completion's logprobs are thousands of decodes."""
        if req.requested_logprobs is None:
            return None
        tb = self._token_bytes
        table = tb[1] if tb is not None and tb[0] is self.state.engine.tokenizer else None
        return await self._off_loop(chat_logprobs, items, self._decode_token_list, table)

    async def _completion_logprobs(
        self, items: list[Any], req: CompletionRequest, offset: int = 0
    ) -> dict[str, Any] | None:
        if req.requested_logprobs is None:
            return None
        return await self._off_loop(completion_logprobs, items, self._decode_token_list, offset)
