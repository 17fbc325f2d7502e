"""One configuration object for the runtime server, read from ``AUTOGLM_RUNTIME_*`` variables.

CLI flags override the environment (``cli.py`` passes them as init arguments). Everything is
validated once, at start, and a bad value fails fast with a message naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from autoglm_runtime import defaults
from autoglm_runtime.defaults import Dtype

if TYPE_CHECKING:
    from autoglm_runtime.multimodal import MediaLimits

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class RuntimeSettings(BaseSettings):
    """Settings of ``autoglm-runtime serve``; environment variable names are ``AUTOGLM_RUNTIME_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="AUTOGLM_RUNTIME_", extra="ignore", validate_default=True)

    model: Path = Field(description="Directory of a Hugging Face causal LM (config, weights, tokenizer).")
    served_model_name: str | None = Field(default=None, description="Name clients use; default: the model dir's name.")
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=defaults.PORT, ge=0, le=65535, description="Port of the API and /metrics.")

    max_batch_size: int = Field(
        default=defaults.MAX_BATCH_SIZE, ge=1, description="Most sequences decoded together in one step."
    )
    max_queue: int = Field(default=defaults.MAX_QUEUE, ge=0, description="Most requests waiting; more get 429.")
    max_pending_requests: int | None = Field(
        default=None,
        ge=1,
        description="Most requests being read, decoded or tokenized before the engine's queue; more get 429 "
        "before their body is decoded. Default: max_batch_size + max_queue.",
    )
    max_batch_tokens: int | None = Field(default=None, ge=1, description="Token budget per step (chunked prefill).")
    max_model_len: int | None = Field(
        default=None, ge=1, description="Prompt + completion limit; default: the model's."
    )
    dtype: Dtype = Field(default="auto", description="Weights dtype; auto: the model's own, float32 on CPU.")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu or cuda.")
    kv_cache_memory: int | None = Field(
        default=None,
        ge=1,
        description="Bytes of the paged KV cache; default: room for max_batch_size x max_model_len tokens, "
        "capped at a share of the free memory (0.9 on GPU, 0.5 of the cgroup's room on CPU).",
    )
    kv_block_size: int = Field(default=16, ge=1, le=1024, description="Token positions per KV cache block.")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV of prompt prefixes seen before (--no-prefix-caching: off)."
    )

    api_key: str | None = Field(default=None, repr=False)
    api_key_file: Path | None = Field(default=None, description="File holding the API key clients must send.")
    ssl_certfile: Path | None = Field(default=None, description="Serve HTTPS with this PEM certificate (chain).")
    ssl_keyfile: Path | None = Field(default=None, description="The certificate's PEM private key.")

    max_image_pixels: int = Field(default=5_000_000, ge=1, description="Most pixels of one image (before resizing).")
    max_images_per_request: int = Field(default=10, ge=0, description="Most images in one request.")
    # NoDecode: the environment gives "a.example,b.example" (comma-separated), not JSON.
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts whose http(s) image URLs are fetched; none by default."
    )

    drain_timeout_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    request_timeout_seconds: float | None = Field(default=None, gt=0, description="Abort a request running longer.")
    revision: str = Field(default="unknown", description="Label of the deployed revision in metrics.")
    enable_reload: bool = Field(default=False, description="Serve POST /admin/reload (off: 403).")
    reload_root: Path | None = Field(
        default=None,
        description="Reload accepts only model folders under this directory; default: the parent of --model.",
    )
    allow_client_priority: bool = Field(
        default=False, description="Honour a request's `priority` (off: a non-zero priority is refused with 400)."
    )
    log_level: LogLevel = Field(default="info", description="Log level.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {v!r} (expected auto, cpu or cuda)")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> RuntimeSettings:
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("set api_key or api_key_file, not both")
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc.strerror}") from None
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} is empty")
            self.api_key = key
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both ssl_certfile and ssl_keyfile, or neither")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            import ssl

            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"cannot use the TLS certificate {self.ssl_certfile} / key {self.ssl_keyfile}: {exc}"
                ) from None
        if self.served_model_name is None:
            self.served_model_name = self.model.resolve().name or str(self.model)
        if self.reload_root is None:
            self.reload_root = self.model.resolve().parent
        return self

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _domains(cls, v: object) -> object:
        if isinstance(v, str):  # "a.example,b.example" from a flag or the environment
            return [d.strip() for d in v.split(",") if d.strip()]
        return v

    @property
    def media_limits(self) -> MediaLimits:
        from autoglm_runtime.multimodal import MediaLimits

        return MediaLimits(
            max_image_pixels=self.max_image_pixels,
            max_images_per_request=self.max_images_per_request,
            allowed_media_domains=tuple(self.allowed_media_domains),
        )

    @property
    def engine_capacity(self) -> int:
        """Requests the engine holds at most (running + waiting): more in progress means a full server."""
        return self.max_batch_size + self.max_queue

    @property
    def pending_limit(self) -> int:
        return self.max_pending_requests or self.engine_capacity

    @property
    def model_name(self) -> str:
        assert self.served_model_name is not None
        return self.served_model_name


def format_validation_error(exc: Exception) -> str:
    """One line per bad setting, naming the environment variable or flag."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        where = f"{loc} (--{loc.replace('_', '-')} / AUTOGLM_RUNTIME_{loc.upper()})" if loc else "settings"
        msg = err.get("msg", "invalid")
        lines.append(f"invalid setting {where}: {msg}")
    return "; ".join(lines)
