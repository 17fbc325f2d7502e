"""The lifecycle of one server: loading, readiness, draining, in-flight requests, hot reload, and the one
worker thread that tokenizes off the event loop (tokenizers are not safe to call from several threads).

The model loads inside the server's lifespan (``load``), in a worker thread, after the port is open:
meanwhile ``/health`` answers ok, ``/ready`` answers 503 ``loading`` and requests get 503 ``not_ready``.
A load that fails leaves a ``StartupError`` (its message and exit code) for the CLI to report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autoglm_runtime.config import RuntimeSettings
from autoglm_runtime.engine_api import EngineClient
from autoglm_runtime.loader import ModelLoadError
from autoglm_runtime.metrics import RuntimeMetrics
from autoglm_runtime.server import errors
from autoglm_runtime.server.admission import AdmissionGate

log = logging.getLogger("autoglm_runtime.server")


class StartupError(Exception):
    """The model or the engine could not be made: one line for the operator and the process's exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ServerState:
    """Lifecycle of one server: loading, readiness, draining, in-flight requests, hot reload.

    ``engine`` is given (tests) or made by ``load(make_engine)`` in the lifespan; until then the
    ``engine`` property answers 503 ``not_ready``."""

    def __init__(
        self,
        settings: RuntimeSettings,
        engine: EngineClient | None,
        metrics: RuntimeMetrics,
        max_model_len: int = 0,
    ) -> None:
        self.settings = settings
        self._engine: EngineClient | None = None
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.started = False
        self.draining = False
        self.startup_error: StartupError | None = None
        self.inflight = 0
        self.admission = AdmissionGate(settings.engine_capacity, settings.pending_limit)
        self._idle = asyncio.Event()
        self._idle.set()
        self._reload_lock: asyncio.Lock | None = None
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoglm-tokenize")
        if engine is not None:
            self._attach(engine, max_model_len)

    def _attach(self, engine: EngineClient, max_model_len: int) -> None:
        self._engine = engine
        self.max_model_len = max_model_len
        self.metrics.bind_stats(engine.stats)

    @property
    def engine(self) -> EngineClient:
        if self._engine is None:
            raise errors.ServiceUnavailableError("The model is not loaded yet.", code="not_ready", retry_after=1)
        return self._engine

    async def load(self, make_engine: Callable[[], EngineClient] | None) -> None:
        """Make the engine (in a worker thread: loading takes seconds to minutes), start it, and turn
        ready. Raises ``StartupError`` (also kept in ``startup_error``) when it cannot."""
        try:
            if self._engine is None:
                assert make_engine is not None, "a ServerState without an engine needs make_engine"
                started = time.monotonic()
                engine = await asyncio.to_thread(make_engine)
                self._attach(engine, int(engine.max_model_len))
                log.info("Loaded model, model=%s seconds=%.2f", self.settings.model, time.monotonic() - started)
            await self.engine.start()
        except StartupError as exc:
            self.startup_error = exc
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported as one line, not a traceback
            log.debug("Failed to start the engine", exc_info=True)
            self.startup_error = StartupError(f"cannot start the engine: {type(exc).__name__}: {exc}")
            raise self.startup_error from None
        self.started = True
        log.info("Started engine, model=%s max_model_len=%d", self.settings.model_name, self.max_model_len)

    async def stop(self) -> None:
        self.started = False
        if self._engine is not None:
            await self._engine.stop()
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # ---- readiness ----
    def healthy(self) -> bool:
        """The process can serve or is on its way: while loading it is healthy, once a load failed not."""
        if self._engine is None:
            return self.startup_error is None
        try:
            return bool(self.engine.check_health())
        except Exception:  # noqa: BLE001 - an engine that cannot answer is not healthy
            log.exception("Failed health check")
            return False

    def ready(self) -> bool:
        return self.started and not self.draining and self.healthy()

    # ---- in-flight accounting ----
    def admit(self) -> Slot:
        if self.draining:
            raise errors.DrainingError()
        if not self.started:
            raise errors.ServiceUnavailableError("The model is not loaded yet.", code="not_ready", retry_after=1)
        self.inflight += 1
        self._idle.clear()
        return Slot(self)

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait (at most ``timeout`` s) for in-flight requests. True if all finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        log.info("Started draining, in_flight=%d timeout_s=%.1f", self.inflight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("Drain timed out, in_flight=%d", self.inflight)
            return False
        if self._engine is None:
            return True
        try:
            await asyncio.wait_for(
                self._engine.drain(max(0.0, deadline - time.monotonic())), timeout=max(0.1, deadline - time.monotonic())
            )
        except TimeoutError:
            return False
        log.info("Drained all requests")
        return True

    # ---- hot reload ----
    def _allowed_model_dir(self, model: str) -> Path:
        root = self.settings.reload_root
        assert root is not None  # settings default it to the model's parent
        model_dir = Path(model).resolve()
        if not model_dir.is_relative_to(root.resolve()):
            raise errors.PermissionDeniedError(
                f"Reload accepts only model folders under {root}.", param="model", code="model_not_allowed"
            )
        return model_dir

    async def reload(self, model: str | None = None, revision: str | None = None) -> dict[str, Any]:
        """Loads ``model`` (a folder under ``--reload-root``; default: the current one) next to the serving
        model. Raises APIError: 403 outside the root, 400 not loadable, 409 not enough memory for both."""
        if self.draining:
            raise errors.DrainingError()
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            model_dir = self._allowed_model_dir(model) if model else self.settings.model
            if not model_dir.is_dir():
                raise errors.BadRequestError(
                    f"Model directory {model_dir} does not exist.", param="model", code="model_not_found"
                )
            started = time.monotonic()
            log.info("Started hot reload, model=%s", model_dir)
            try:
                await self.engine.reload(model_dir, revision=revision or self.metrics.revision)
            except ModelLoadError as exc:
                self.metrics.reloads_total.labels(*self.metrics.labels, "error").inc()
                log.error("Failed hot reload, model=%s error=%s", model_dir, exc)
                raise errors.from_engine(exc) from None
            self.settings.model = model_dir
            self.max_model_len = self.engine.max_model_len
            self.metrics.set_labels(revision=revision)
            self.metrics.reloads_total.labels(*self.metrics.labels, "success").inc()
            seconds = time.monotonic() - started
            log.info("Finished hot reload, model=%s seconds=%.2f", model_dir, seconds)
            return {
                "status": "reloaded",
                "model": str(model_dir),
                "revision": self.metrics.revision,
                "seconds": round(seconds, 3),
            }


class Slot:
    """One admitted request; ``release()`` is idempotent."""

    __slots__ = ("state", "released")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state._release()
