"""Unit tests of image content parts (multimodal.py): parsing, limits, decoding, URL policy. The
allowed-domain fetch goes to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

Image = pytest.importorskip("PIL.Image")

from autoglm_runtime.config import RuntimeSettings  # noqa: E402
from autoglm_runtime.multimodal import (  # noqa: E402
    MediaError,
    MediaLimits,
    chat_prompt_with_images,
    decode_image,
    has_images,
    load_images,
    split_messages,
)


def png(w=40, h=30, color=(10, 200, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def part(data: bytes, mime="image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def test_split_messages_keeps_order_and_text():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [part(png()), {"type": "text", "text": "hi"}, part(png(color=(1, 2, 3)))]},
    ]
    assert has_images(msgs) and not has_images(msgs[:1])
    tmpl, refs = split_messages(msgs, MediaLimits())
    assert tmpl == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}, {"type": "image"}]},
    ]
    assert [r.where for r in refs] == ["messages[1].content[0]", "messages[1].content[2]"]


def test_limits_and_refusals():
    with pytest.raises(MediaError, match="--max-images-per-request") as e:
        split_messages([{"role": "user", "content": [part(png())] * 3}], MediaLimits(max_images_per_request=2))
    assert e.value.code == "too_many_images"
    with pytest.raises(MediaError, match="user messages only"):
        split_messages([{"role": "assistant", "content": [part(png())]}], MediaLimits())
    with pytest.raises(MediaError, match="--max-image-pixels"):
        decode_image(png(100, 100), "img", MediaLimits(max_image_pixels=9_999))
    decode_image(png(100, 100), "img", MediaLimits(max_image_pixels=10_000))  # the limit itself is accepted
    with pytest.raises(MediaError, match="format GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="GIF")
        decode_image(buf.getvalue(), "img", MediaLimits())
    with pytest.raises(MediaError, match="cannot decode"):
        decode_image(png()[:-30], "img", MediaLimits())
    for fmt in ("JPEG", "WEBP"):
        assert decode_image(png(fmt=fmt), "img", MediaLimits()).image.size == (40, 30)


async def test_urls_refused_unless_allowed_and_fetched_when_allowed():
    body = png(12, 12)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/a.png" else 404)
            self.end_headers()
            if self.path == "/a.png":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url + "/a.png"}}]}]
        _, refs = split_messages(msgs, MediaLimits())
        with pytest.raises(MediaError, match="--allowed-media-domains") as e:
            await load_images(refs, MediaLimits())
        assert e.value.code == "image_url_not_allowed"
        with pytest.raises(MediaError, match="--allowed-media-domains"):
            await load_images(refs, MediaLimits(allowed_media_domains=("example.com",)))
        (img,) = await load_images(refs, MediaLimits(allowed_media_domains=("127.0.0.1",)))
        assert img.image.size == (12, 12)
        _, missing = split_messages(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url + "/b"}}]}], MediaLimits()
        )
        with pytest.raises(MediaError, match="HTTP 404"):
            await load_images(missing, MediaLimits(allowed_media_domains=("127.0.0.1",)))
    finally:
        srv.shutdown()


async def test_base64_and_pixels_are_decoded_off_the_event_loop(monkeypatch):
    import autoglm_runtime.multimodal as mm

    threads: list[str] = []
    real = mm.base64.b64decode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(mm.base64, "b64decode", recording)
    refs = split_messages([{"role": "user", "content": [part(png())]}], MediaLimits())[1]
    (decoded,) = await load_images(refs, MediaLimits())
    assert decoded.image.size == (40, 30)
    assert threads and threading.main_thread().name not in threads


async def test_text_only_model_refuses_images():
    with pytest.raises(MediaError, match="text-only") as e:
        await chat_prompt_with_images(None, object(), [{"role": "user", "content": [part(png())]}], MediaLimits())
    assert e.value.code == "images_not_supported"


def test_settings_flags(tmp_path):
    s = RuntimeSettings(model=tmp_path, allowed_media_domains="a.example, b.example", max_image_pixels=7)
    assert s.media_limits == MediaLimits(
        max_image_pixels=7, max_images_per_request=10, allowed_media_domains=("a.example", "b.example")
    )


def test_allowed_media_domains_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_RUNTIME_ALLOWED_MEDIA_DOMAINS", "a.example, b.example")
    assert RuntimeSettings(model=tmp_path).allowed_media_domains == ["a.example", "b.example"]


def test_cli_flags_reach_the_settings(tmp_path):
    from autoglm_runtime.cli import build_parser, settings_from_args

    args = build_parser().parse_args(
        [
            "serve",
            str(tmp_path),
            "--max-image-pixels",
            "123",
            "--max-images-per-request",
            "2",
            "--allowed-media-domains",
            "cdn.example,img.example",
        ]
    )
    s = settings_from_args(args)
    assert (s.max_image_pixels, s.max_images_per_request, s.allowed_media_domains) == (
        123,
        2,
        ["cdn.example", "img.example"],
    )
