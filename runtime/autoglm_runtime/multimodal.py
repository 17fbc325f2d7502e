"""Image content parts of chat requests: parsing, limits, decoding (no torch here).

An OpenAI chat message may carry `{"type": "image_url", "image_url": {"url": ...}}` parts (also the
shorthand `"image_url": "..."`). Served:

- `data:image/png|jpeg|webp;base64,...` URIs, decoded in a worker thread with Pillow; the decoded
  format must be PNG, JPEG or WebP whatever the URI claims.
- `http(s)://` URLs only when the host is listed in `--allowed-media-domains` (fetched with a
  timeout and a size cap); otherwise refused: a server must not fetch arbitrary URLs for clients.

Limits, each a 400 naming the setting: `--max-images-per-request` (checked before anything is
decoded), `--max-image-pixels` (checked from the image header, before the pixels are decoded, so
a decompression bomb costs nothing), `MAX_IMAGE_BYTES` for the encoded size. A truncated or
corrupt image is a 400 too (`MediaError`), never a 500.

`split_messages` turns the request's messages into chat-template messages (image parts become
`{"type": "image"}`, which GLM-4.1V's template renders as `<|begin_of_image|><|image|><|end_of_image|>`)
plus the list of image references in order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "content_hash",
    "ImageRef",
    "MediaError",
    "MediaLimits",
    "DecodedImage",
    "split_messages",
    "has_images",
    "chat_prompt_with_images",
    "decode_image",
    "load_images",
]

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # encoded size of one image
FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}  # MPO: the multi-picture JPEG many phone cameras write
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class MediaError(ValueError):
    """An image part that cannot be served; `param` and `code` go into the 400 body."""

    def __init__(self, message: str, code: str = "invalid_image", param: str = "messages") -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 5_000_000
    max_images_per_request: int = 10
    allowed_media_domains: tuple[str, ...] = ()
    fetch_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ImageRef:
    url: str
    where: str  # e.g. "messages[2].content[0]" for error messages


@dataclass
class DecodedImage:
    image: Any = field(repr=False)  # PIL.Image.Image, RGB, fully loaded
    hash: str  # sha256 of the encoded bytes (the encoder cache key)


def content_hash(data: bytes) -> str:
    """The encoder cache's key for an image: SHA-256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def _image_url(part: dict[str, Any]) -> str | None:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def has_images(messages: list[Any]) -> bool:
    for m in messages:
        content = m.content if hasattr(m, "content") else m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in content
        ):
            return True
    return False


def split_messages(messages: list[Any], limits: MediaLimits) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Template messages and the images they reference, in prompt order."""
    out: list[dict[str, Any]] = []
    refs: list[ImageRef] = []
    for i, m in enumerate(messages):
        role = m.role if hasattr(m, "role") else m.get("role")
        content = m.content if hasattr(m, "content") else m.get("content")
        if not isinstance(content, list):
            out.append({"role": role, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "image"):
                url = _image_url(part)
                if url is None:
                    raise MediaError(f"{where}: an image_url part needs image_url.url (a data: URI)")
                if role != "user":
                    raise MediaError(f"{where}: images are accepted in user messages only")
                refs.append(ImageRef(url, where))
                parts.append({"type": "image"})
            else:
                raise MediaError(f"{where}: unsupported content part type {kind!r}; text and image_url are served")
        out.append({"role": role, "content": parts})
    if len(refs) > limits.max_images_per_request:
        raise MediaError(
            f"the request has {len(refs)} images; this server accepts at most "
            f"{limits.max_images_per_request} per request (--max-images-per-request)",
            code="too_many_images",
        )
    return out, refs


def _decode_data_uri(url: str, where: str) -> bytes:
    m = _DATA_URI.match(url)
    if m is None or not m.group("b64"):
        raise MediaError(f"{where}: expected a base64 data URI (data:image/png;base64,...)")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise MediaError(f"{where}: data URI has media type {mime!r}; images (PNG, JPEG, WebP) are served")
    payload = url[m.end() :]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise MediaError(
            f"{where}: the image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", code="image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the data URI is not valid base64") from None


def decode_image(data: bytes, where: str, limits: MediaLimits) -> DecodedImage:
    """Decode one image fully (call in a worker thread). Raises MediaError for anything wrong."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(
            f"{where}: the image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", code="image_too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in FORMATS:
                raise MediaError(f"{where}: image format {img.format} is not served; use PNG, JPEG or WebP")
            w, h = img.size
            if w * h > limits.max_image_pixels:
                raise MediaError(
                    f"{where}: the image has {w}x{h} = {w * h} pixels; this server accepts at most "
                    f"{limits.max_image_pixels} (--max-image-pixels)",
                    code="image_too_large",
                )
            if w < 1 or h < 1 or max(w, h) / min(w, h) > 200:
                raise MediaError(f"{where}: image size {w}x{h} is not served (aspect ratio above 200)")
            img.load()
            rgb = img.convert("RGB")
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{where}: cannot decode the image: {type(exc).__name__}: {str(exc)[:200]}") from None
    return DecodedImage(rgb, content_hash(data))


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (a.lower().strip(".") for a in allowed))


async def _fetch(url: str, where: str, limits: MediaLimits) -> bytes:
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=limits.fetch_timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise MediaError(
                        f"{where}: fetching the image URL answered HTTP {resp.status}", code="image_fetch_failed"
                    )
                data = await resp.content.read(MAX_IMAGE_BYTES + 1)
    except MediaError:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise MediaError(
            f"{where}: cannot fetch the image URL: {type(exc).__name__}", code="image_fetch_failed"
        ) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise MediaError(
            f"{where}: the image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", code="image_too_large"
        )
    return data


async def load_images(refs: list[ImageRef], limits: MediaLimits) -> list[DecodedImage]:
    """Fetch (allowed hosts only) and decode every image: base64 and pixels both off the event loop."""
    import asyncio

    blobs: list[tuple[str | bytes, str]] = []  # a data: URI (base64-decoded in the worker) or fetched bytes
    for ref in refs:
        scheme = urlsplit(ref.url).scheme.lower()
        if scheme == "data":
            blobs.append((ref.url, ref.where))
        elif scheme in ("http", "https"):
            host = urlsplit(ref.url).hostname or ""
            if not limits.allowed_media_domains or not _host_allowed(host, limits.allowed_media_domains):
                raise MediaError(
                    f"{ref.where}: image URLs are not fetched by this server (host {host!r} is not in "
                    f"--allowed-media-domains); send the image inline as a data: URI",
                    code="image_url_not_allowed",
                )
            blobs.append((await _fetch(ref.url, ref.where, limits), ref.where))
        else:
            raise MediaError(f"{ref.where}: unsupported image URL scheme {scheme!r}; send a data: URI")

    def decode_all() -> list[DecodedImage]:
        return [decode_image(_decode_data_uri(b, w) if isinstance(b, str) else b, w, limits) for b, w in blobs]

    return await asyncio.to_thread(decode_all)


async def chat_prompt_with_images(
    vision: Any,
    tokenizer: Any,
    messages: list[Any],
    limits: MediaLimits,
    run: Callable[..., Awaitable[Any]] | None = None,
) -> tuple[list[int], Any]:
    """Prompt ids and multimodal inputs of a chat request with image parts. `vision` is the
    engine's `VisionLanguage` (None for a text-only model: then any image is a 400). `run(fn, *args)`
    runs the chat template and `vision.process` (both use the tokenizer) off the event loop: the
    server passes its one tokenizer thread; default `asyncio.to_thread`."""
    import asyncio

    template_messages, refs = split_messages(messages, limits)
    if vision is None:
        raise MediaError("this model is text-only and does not accept images", code="images_not_supported")
    images = await load_images(refs, limits)

    def prompt() -> tuple[list[int], Any]:
        try:
            text = tokenizer.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is bad input
            raise MediaError(f"cannot apply the chat template to these messages: {exc}") from None
        return vision.process(text, [d.image for d in images], [d.hash for d in images])

    return await (run or asyncio.to_thread)(prompt)
