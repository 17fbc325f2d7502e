"""``autoglm-runtime``: ``serve`` an OpenAI-compatible server, or ``make-model`` a small test model.

Lifecycle of ``serve``: settings are validated, uvicorn opens the port and the app's lifespan loads the
model in a worker thread (``/health`` ok and ``/ready`` 503 ``loading`` meanwhile; a failure prints one
line and exits 1, or 2 for engine settings that cannot work); uvicorn serves the app with OUR signal
handlers:

- SIGTERM / SIGINT: readiness turns false at once and new requests get 503; in-flight requests
  finish (bounded by ``--drain-timeout``); then the server stops and the process exits 0.
  A second signal exits at once.
- SIGHUP: hot reload of the model directory (``engine.reload``); ``POST /admin/reload`` (only with
  ``--enable-reload``) can also name another folder under ``--reload-root``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from autoglm_runtime import defaults
from autoglm_runtime.config import RuntimeSettings, format_validation_error

log = logging.getLogger("autoglm_runtime")

PROG = "autoglm-runtime"


TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath


def _fail(message: str, code: int = 1) -> int:
    """Print one line and, in a pod, leave it as the container's termination message."""
    line = f"{PROG}: error: {message}"
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("AUTOGLM_TERMINATION_LOG", TERMINATION_LOG)
    if os.path.isfile(path):
        try:
            with open(path, "w") as f:
                f.write(line[:4096])
        except OSError:
            pass
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Continuous-batching OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="Serve a model over the OpenAI API (flags override AUTOGLM_RUNTIME_* env).")
    s.add_argument("model_pos", nargs="?", metavar="MODEL_DIR", help="model directory (same as --model)")
    s.add_argument("--model", help="model directory [env AUTOGLM_RUNTIME_MODEL]")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--served-model-name")
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--max-queue", type=int)
    s.add_argument(
        "--max-pending-requests",
        type=int,
        metavar="N",
        help="most requests read, decoded or tokenized before the engine's queue; more get 429 before their "
        "body is decoded (default: max-batch-size + max-queue)",
    )
    s.add_argument("--max-batch-tokens", type=int)
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--dtype", choices=defaults.DTYPES)
    s.add_argument(
        "--kv-cache-memory",
        type=int,
        metavar="BYTES",
        help="bytes of the paged KV cache (default: max-batch-size x max-model-len tokens, capped at a share "
        "of the free memory) [env AUTOGLM_RUNTIME_KV_CACHE_MEMORY]",
    )
    s.add_argument("--kv-block-size", type=int, metavar="TOKENS", help="token positions per KV block (default 16)")
    s.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_const",
        const=False,
        help="do not reuse the KV of prompt prefixes (on by default) [env AUTOGLM_RUNTIME_ENABLE_PREFIX_CACHING]",
    )
    s.add_argument("--device")
    s.add_argument("--api-key-file")
    s.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate [env AUTOGLM_RUNTIME_SSL_CERTFILE]")
    s.add_argument("--ssl-keyfile", help="the certificate's PEM private key [env AUTOGLM_RUNTIME_SSL_KEYFILE]")
    s.add_argument("--revision", help="revision label on metrics")
    s.add_argument("--drain-timeout", dest="drain_timeout_seconds", type=float, metavar="SECONDS")
    s.add_argument("--request-timeout", dest="request_timeout_seconds", type=float, metavar="SECONDS")
    s.add_argument("--max-image-pixels", type=int, help="most pixels of one image (default 5000000)")
    s.add_argument("--max-images-per-request", type=int, help="most images in one request (default 10)")
    s.add_argument(
        "--allowed-media-domains",
        metavar="HOST[,HOST...]",
        help="hosts whose http(s) image URLs may be fetched (default: none, data: URIs only)",
    )
    s.add_argument(
        "--enable-reload",
        action="store_const",
        const=True,
        help="serve POST /admin/reload (off by default) [env AUTOGLM_RUNTIME_ENABLE_RELOAD]",
    )
    s.add_argument(
        "--reload-root",
        metavar="DIR",
        help="reload accepts only model folders under DIR (default: the parent of --model)",
    )
    s.add_argument(
        "--allow-client-priority",
        action="store_const",
        const=True,
        help="honour the `priority` request field (off: a non-zero priority gets 400)",
    )
    s.add_argument("--log-level", type=str.lower, choices=["debug", "info", "warning", "error", "critical"])

    m = sub.add_parser("make-model", help="Write a randomly initialised GLM model and tokenizer to a directory.")
    m.add_argument(
        "--size",
        choices=["tiny", "small", "tiny-vl", "small-vl"],
        default="tiny",
        help="tiny/small: GLM text models; tiny-vl/small-vl: GLM-4.1V-shaped vision-language models",
    )
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> RuntimeSettings:
    """Environment first, then every flag that was given on top."""
    overrides: dict[str, Any] = {}
    for name in (
        "host",
        "port",
        "served_model_name",
        "max_batch_size",
        "max_queue",
        "max_pending_requests",
        "max_batch_tokens",
        "max_model_len",
        "dtype",
        "device",
        "kv_cache_memory",
        "kv_block_size",
        "enable_prefix_caching",
        "api_key_file",
        "ssl_certfile",
        "ssl_keyfile",
        "revision",
        "drain_timeout_seconds",
        "request_timeout_seconds",
        "log_level",
        "enable_reload",
        "reload_root",
        "allow_client_priority",
        "max_image_pixels",
        "max_images_per_request",
        "allowed_media_domains",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    model = args.model or args.model_pos
    if model is not None:
        overrides["model"] = model
    if "api_key_file" in overrides:
        overrides["api_key"] = None  # a flag beats a key from the environment
    return RuntimeSettings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-model":
        return _make_model(args)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return _fail(format_validation_error(exc), 2)
    return serve(settings)


def _make_model(args: argparse.Namespace) -> int:
    from autoglm_runtime.modelmaker import make_model
    from autoglm_runtime.modelmaker_vl import VL_SIZES, make_vl_model

    try:
        maker = make_vl_model if args.size in VL_SIZES else make_model
        out = maker(args.size, args.out, seed=args.seed)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot make the model: {exc}")
    print(out if out is not None else args.out)
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(settings: RuntimeSettings) -> int:
    _configure_logging(settings.log_level)
    if not settings.model.is_dir():
        return _fail(f"cannot load model: {settings.model} is not a directory")
    try:
        return asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        return 130


def _engine_maker(settings: RuntimeSettings, metrics: Any) -> Any:
    """What the server's lifespan calls in a worker thread: load the model, make the engine. Every failure
    is a ``StartupError`` (one line, the exit code: 1 for the model, 2 for settings that cannot work)."""

    def make() -> Any:
        from autoglm_runtime.engine import Engine
        from autoglm_runtime.loader import ModelLoadError, load_model
        from autoglm_runtime.model_runner import KVCacheTooLargeError
        from autoglm_runtime.server.state import StartupError
        from autoglm_runtime.vision import VisionMetrics

        try:
            loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device)
        except ModelLoadError as exc:
            raise StartupError(f"cannot load model from {settings.model}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's model/dir; one line, no traceback
            log.debug("Failed to load model", exc_info=True)
            raise StartupError(f"cannot load model from {settings.model}: {type(exc).__name__}: {exc}") from None
        if settings.max_model_len and settings.max_model_len > int(loaded.max_model_len):
            log.warning(
                "Capped max_model_len at the model's, model_max=%s max_model_len=%s",
                loaded.max_model_len,
                settings.max_model_len,
            )
        try:
            engine = Engine(
                loaded,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_batch_tokens=settings.max_batch_tokens or max(2048, settings.max_batch_size),
                max_model_len=settings.max_model_len,
                revision=settings.revision,
                on_step=metrics.on_step,
                kv_cache_memory=settings.kv_cache_memory,
                block_size=settings.kv_block_size,
                enable_prefix_caching=settings.enable_prefix_caching,
            )
        except KVCacheTooLargeError as exc:
            raise StartupError(f"invalid engine settings: {exc}", 2) from None
        except ModelLoadError as exc:  # e.g. an architecture the model runner does not support
            raise StartupError(f"cannot load model from {settings.model}: {exc}") from None
        metrics.registry.register(VisionMetrics(engine, lambda: metrics.labels))
        return engine

    return make


class _Server:
    """uvicorn.Server without its own signal handling (the lifecycle below owns the signals)."""

    @staticmethod
    def make(config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(config)


async def _serve(settings: RuntimeSettings) -> int:
    import uvicorn

    from autoglm_runtime.metrics import RuntimeMetrics
    from autoglm_runtime.server.api import create_app
    from autoglm_runtime.server.state import ServerState, StartupError

    metrics = RuntimeMetrics(settings.model_name, settings.revision)
    state = ServerState(settings, None, metrics)
    failed: list[StartupError] = []

    def on_startup_error(exc: StartupError) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(state, _engine_maker(settings, metrics), on_startup_error)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
    )
    server = _Server.make(config)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def shutdown(signame: str) -> None:
        log.info("Received %s, draining, timeout_s=%.1f", signame, settings.drain_timeout_seconds)
        await state.drain(settings.drain_timeout_seconds)
        server.should_exit = True

    def on_stop_signal(signame: str) -> None:
        if state.draining:
            log.warning("Received %s again, exiting now", signame)
            server.should_exit = True
            server.force_exit = True
            return
        state.draining = True  # readiness false and new requests 503 from this instant
        spawn(shutdown(signame))

    async def reload_on_hup() -> None:
        try:
            await state.reload()
        except Exception as exc:  # noqa: BLE001 - a failed reload keeps the old model serving
            log.error("Failed SIGHUP reload: %s", getattr(exc, "message", exc))

    loop.add_signal_handler(signal.SIGTERM, on_stop_signal, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop_signal, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload_on_hup()))
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if failed:
        return _fail(failed[0].message, failed[0].exit_code)
    if not server.started:
        return _fail(f"the server did not start on {settings.host}:{settings.port} (see the log above)")
    log.info("Exited, pid=%d", os.getpid())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
