"""The engine's step loop: the thread that applies the inbox, schedules, runs the model and publishes stats.

The event loop never takes a lock this thread holds: admissions, aborts and reloads are appended to
`StepLoop.inbox` (a deque) with `send()` and applied between steps; answers and outputs go back
through an `engine_output.Outbox`; `snapshot` is what `Engine.stats()` reads, republished after
every change. Per step: apply the inbox, schedule every live model, build inputs, one forward +
sampling, one host sync (`.tolist()`), then `engine_output.step_outputs` and one delivery.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .engine_api import EngineDeadError, QueueFullError
from .engine_output import EngineRequest, Outbox, abort_output, step_outputs
from .loader import LoadedModel, ModelLoadError
from .logprobs import TokenLogprob
from .model_runner import ModelRunner
from .scheduler import FinishReason, Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    batch_size: int  # sequences in the step (decodes + prefill chunks)
    num_decode_tokens: int
    num_prefill_tokens: int
    step_seconds: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float


class ModelInstance:
    """One loaded model with its KV cache and its scheduler."""

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler: Scheduler, revision: str) -> None:
        self.loaded = loaded
        self.runner = runner
        self.scheduler = scheduler
        self.revision = revision
        backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError("the runtime needs a fast tokenizer (tokenizer.json)")
        self.backend_tokenizer = backend
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.vocab_size = loaded.model.get_input_embeddings().num_embeddings


class StepLoop:
    """The engine thread and everything it owns: the live models (the serving one last), the inbox,
    the step counters and the stats snapshot."""

    def __init__(
        self,
        first: ModelInstance,
        requests: dict[str, EngineRequest],
        outbox: Outbox,
        on_step: Callable[[StepStats], None] | None,
    ) -> None:
        self.instances: list[ModelInstance] = [first]
        self.requests = requests  # the event loop's admitted requests: failed all at once if the loop dies
        self.outbox = outbox
        self.on_step = on_step
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.dead: BaseException | None = None
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._retired = (0, 0, 0)  # prefix cache queries, hits, preemptions of released models
        self.snapshot: tuple[Any, ...] = (0, 0, 0.0, 0.0, 1, (0, 0, 0, 0, 0))
        self.publish_stats()

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="autoglm-engine", daemon=True)
        self.thread.start()

    def running(self) -> bool:
        return self.dead is None and self.thread is not None and self.thread.is_alive()

    def send(self, command: tuple[Any, ...]) -> None:
        """Queues ("add", req, admitted_future), ("abort", req, done_future | None) or ("reload", instance)."""
        self.inbox.append(command)
        self.wakeup.set()

    # ------------------------------------------------------------------ engine thread
    def abort_now(self, req: EngineRequest) -> None:
        if req.seq.is_finished:
            return
        req.instance.scheduler.finish(req.seq, FinishReason.ABORT)
        self.publish_stats()
        self.outbox.deliver([(req, abort_output(req))])

    def publish_stats(self) -> None:
        inst = list(self.instances)
        self.snapshot = (
            sum(i.scheduler.num_running for i in inst),
            sum(i.scheduler.num_waiting for i in inst),
            sum(i.scheduler.kv_cache_usage for i in inst) / len(inst),
            sum(i.scheduler.slot_usage for i in inst) / len(inst),
            len(inst),
            (
                sum(i.scheduler.blocks.num_used_blocks for i in inst),
                sum(i.scheduler.blocks.num_usable_blocks for i in inst),
                self._retired[0] + sum(i.scheduler.blocks.queries for i in inst),
                self._retired[1] + sum(i.scheduler.blocks.hits for i in inst),
                self._retired[2] + sum(i.scheduler.num_preemptions for i in inst),
            ),
        )

    def handle_inbox(self, refuse: BaseException | None = None) -> None:
        """Applies the commands the event loop sent (in order), publishes the stats, then answers: whoever
        was told "admitted" or "aborted" reads stats that include it. With ``refuse``, admissions fail with it."""
        replies: list[tuple[asyncio.Future, BaseException | None]] = []
        while self.inbox:
            cmd = self.inbox.popleft()
            if cmd[0] == "add":
                _, req, admitted = cmd
                error: BaseException | None = refuse
                if error is None:
                    try:
                        req.instance.scheduler.add_request(req.seq)
                    except QueueFullError as exc:
                        error = exc
                    except Exception as exc:  # noqa: BLE001 - fails this request only, never the loop
                        log.exception("Failed to admit request request_id=%s", req.seq.request_id)
                        error = exc
                replies.append((admitted, error))
            elif cmd[0] == "abort":
                _, req, done = cmd
                self.abort_now(req)
                if done is not None:
                    replies.append((done, None))
            elif cmd[0] == "reload":
                self.instances.append(cmd[1])
        self.publish_stats()
        for fut, error in replies:
            self.outbox.answer(fut, error)

    def release_idle_models(self) -> None:
        if len(self.instances) > 1:  # an old model with no work left after a reload is released
            cur = self.instances[-1]
            for i in self.instances[:-1]:
                if not i.scheduler.has_work():  # its counters live on in the totals
                    b = i.scheduler.blocks
                    q, h, p = self._retired
                    self._retired = (q + b.queries, h + b.hits, p + i.scheduler.num_preemptions)
            self.instances = [i for i in self.instances[:-1] if i.scheduler.has_work()] + [cur]
            self.publish_stats()

    def run(self) -> None:
        try:
            while True:
                self.wakeup.clear()
                self.handle_inbox()
                self.release_idle_models()
                if self.stopping:
                    return
                if not any(i.scheduler.has_work() for i in self.instances):
                    self.wakeup.wait()
                    continue
                work = []
                for inst in self.instances:
                    out = inst.scheduler.schedule()
                    if out.is_empty:
                        continue
                    states = [s.data.sampling for s in out.sampled_sequences]
                    self.publish_stats()
                    work.append((inst, out, inst.runner.prepare(out, states)))
                for inst, out, step in work:
                    t0 = time.perf_counter()
                    tokens = inst.runner.execute(step).tolist()
                    self.finish_step(inst, out, tokens, time.perf_counter() - t0, step.logprobs)
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            log.exception("Engine step loop died")
            self.dead = exc
            err = EngineDeadError(f"engine loop died: {exc!r}")
            self.outbox.deliver([(r, err) for r in list(self.requests.values())])
            self.handle_inbox(err)

    def finish_step(
        self,
        inst: ModelInstance,
        out: SchedulerOutput,
        tokens: list[int],
        seconds: float,
        logprobs: dict[int, TokenLogprob] | None = None,
    ) -> None:
        sched = inst.scheduler
        updated, items = step_outputs(sched, out, tokens, logprobs)
        self.num_steps += 1
        self.prompt_tokens_total += out.num_prefill_tokens
        self.generation_tokens_total += len(updated)
        self.publish_stats()
        if items:
            self.outbox.deliver(items)
        if self.on_step is not None:
            try:
                self.on_step(
                    StepStats(
                        batch_size=len(out.decodes) + len(out.prefills),
                        num_decode_tokens=len(out.decodes),
                        num_prefill_tokens=out.num_prefill_tokens,
                        step_seconds=seconds,
                        num_running=sched.num_running,
                        num_waiting=sched.num_waiting,
                        kv_cache_usage=sched.kv_cache_usage,
                    )
                )
            except Exception:  # noqa: BLE001 - a metrics hook must never kill the loop
                log.exception("on_step hook failed")
