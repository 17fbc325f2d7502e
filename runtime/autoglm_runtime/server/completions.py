"""``POST /v1/completions``."""

from __future__ import annotations

import time
from typing import Any

from autoglm_runtime.server.generation import Delta, EventStream, Generation, sse, stream_events
from autoglm_runtime.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from autoglm_runtime.server.serving import OpenAIServing


class OpenAIServingCompletion(OpenAIServing):
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
            logprobs=await self._completion_logprobs(gen.logprobs, req),
            token_ids=gen.token_ids if req.return_token_ids else None,
            prompt_token_ids=prompt_ids if req.return_token_ids else None,
        )
        return CompletionResponse(id=gen.request_id, model=self.model_name, choices=[choice], usage=gen.usage)

    def _completion_stream(self, gen: Generation, req: CompletionRequest) -> EventStream:
        created = int(time.time())

        offset = 0  # text_offset of the chunk's first token in the whole completion

        async def chunk(d: Delta, ids: list[int], lps: list[Any]) -> str:
            nonlocal offset
            choice = CompletionChoice(
                text=d.text,
                finish_reason=d.finish_reason,
                logprobs=await self._completion_logprobs(lps, req, offset),
                token_ids=ids if req.return_token_ids else None,
            )
            offset += len(d.text)
            return sse(
                CompletionStreamResponse(id=gen.request_id, created=created, model=self.model_name, choices=[choice])
            )

        def usage() -> str:
            return sse(
                CompletionStreamResponse(
                    id=gen.request_id, created=created, model=self.model_name, choices=[], usage=gen.usage
                )
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(stream_events(gen, [], chunk, usage if include_usage else None), gen.close)
