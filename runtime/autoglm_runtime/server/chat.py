"""``POST /v1/chat/completions``: messages through the model's chat template.

Messages with image parts (a vision-language model; see multimodal.py and vision.py) are decoded in worker
threads, then templated and tokenized with their images on the tokenizer thread; a bad image is a 400
naming what is wrong (the limit and its flag), never a 500.
"""

from __future__ import annotations

import time
from typing import Any

from autoglm_runtime.multimodal import MediaError, chat_prompt_with_images, has_images
from autoglm_runtime.server import errors
from autoglm_runtime.server.generation import Delta, EventStream, Generation, sse, stream_events
from autoglm_runtime.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from autoglm_runtime.server.serving import OpenAIServing, Prompt


class OpenAIServingChat(OpenAIServing):
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

    async def _chat_prompt_with_images(self, req: ChatCompletionRequest) -> Prompt:
        tok = self.state.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise errors.BadRequestError("This model has no chat template.", param="messages", code="no_chat_template")
        try:
            ids, mm = await chat_prompt_with_images(
                self.state.engine.vision, tok, req.messages, self.state.settings.media_limits, run=self._off_loop
            )
        except MediaError as exc:
            raise errors.BadRequestError(exc.message, param=exc.param, code=exc.code) from None
        return Prompt(ids, mm)

    async def _prompt(self, req: ChatCompletionRequest) -> list[int] | Prompt:
        if req.requested_logprobs is not None:
            await self._load_token_bytes()
        if has_images(req.messages):
            return await self._chat_prompt_with_images(req)
        return await self._chat_prompt(req)

    async def create_chat_completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        gen = await self._start(req, lambda: self._prompt(req), req.requested_max_tokens, "chatcmpl")
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
            logprobs=await self._chat_logprobs(gen.logprobs, req),
            token_ids=gen.token_ids if req.return_token_ids else None,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        )
        return ChatCompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    def _chat_stream(self, gen: Generation, req: ChatCompletionRequest) -> EventStream:
        created = int(time.time())

        def event(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(
                ChatCompletionStreamResponse(
                    id=gen.request_id, created=created, model=self.model_name, choices=choices, usage=usage
                )
            )

        async def chunk(d: Delta, ids: list[int], lps: list[Any]) -> str:
            return event(
                [
                    ChatStreamChoice(
                        delta=DeltaMessage(content=d.text or None),
                        finish_reason=d.finish_reason,
                        logprobs=await self._chat_logprobs(lps, req),
                        token_ids=ids if req.return_token_ids else None,
                    )
                ]
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = [event([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])]
        return EventStream(
            stream_events(gen, first, chunk, (lambda: event([], gen.usage)) if include_usage else None), gen.close
        )
