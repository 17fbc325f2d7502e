"""Property-based fuzzing of both endpoints against a REAL server process (real tokenizer, real template).

Bodies mix right and wrong types, edge numbers, odd Unicode (lone surrogates included, which JSON can
carry as escapes) and malformed bytes. For every one: no 5xx, an error body that is OpenAI's, a stream
that ends with `[DONE]`, the same keep-alive connection still usable (no reset), no hang; and the
server is alive and serving afterwards. `--max-model-len 64` keeps any accepted request short.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.test_server import start_server

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EDGE_INTS = st.sampled_from([0, 1, -1, 2, 63, 64, 65, 2**31, -(2**31), 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-300, 0.5, 1.0, 2.0, 2.0000001, -1.0, 1e308, math.inf, -math.inf, math.nan])
ODD_TEXT = st.lists(st.characters(codec=None) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
                    | st.sampled_from(["\x00", "\u202e", "\ufeff", "\U0001f600", "\u0301", "<|user|>", "{{", "%}"]),
                    max_size=20).map("".join)
SCALARS = st.none() | st.booleans() | EDGE_INTS | st.integers() | EDGE_FLOATS | st.floats() | ODD_TEXT
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
                        max_leaves=12)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(plausible, plausible, ANY_JSON)


MESSAGE = st.fixed_dictionaries({"role": field(st.sampled_from(["user", "system", "assistant", "tool", ""])),
                                 "content": field(ODD_TEXT | st.lists(st.fixed_dictionaries(
                                     {"type": field(st.just("text")), "text": field(ODD_TEXT)}), max_size=2))})
COMMON = {
    "model": field(st.sampled_from(["tiny", "other"])),
    "max_tokens": field(st.integers(1, 8) | EDGE_INTS),
    "temperature": field(EDGE_FLOATS),
    "top_p": field(EDGE_FLOATS),
    "top_k": field(EDGE_INTS),
    "n": field(EDGE_INTS),
    "seed": field(EDGE_INTS),
    "stop": field(ODD_TEXT | st.lists(ODD_TEXT, max_size=5)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "priority": field(EDGE_INTS),
    "min_tokens": field(st.integers(0, 4) | EDGE_INTS),
    "ignore_eos": field(st.booleans()),
    "return_token_ids": field(st.booleans()),
    "user": field(ODD_TEXT),
    "presence_penalty": field(EDGE_FLOATS),
}
COMPLETION = st.fixed_dictionaries({"prompt": field(ODD_TEXT | st.lists(st.integers(-5, 70000), max_size=6)
                                                    | st.lists(ODD_TEXT, max_size=2))},
                                   optional={**COMMON, "echo": field(st.booleans()), "logprobs": ANY_JSON})
CHAT = st.fixed_dictionaries({"messages": field(st.lists(MESSAGE, max_size=3))},
                             optional={**COMMON, "max_completion_tokens": field(EDGE_INTS), "tools": ANY_JSON})


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz-logs"), "--max-model-len", "64",
                       "--max-batch-size", "8", name="fuzz")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def conn(server):
    """One keep-alive connection for every example: a reset (or a hang) fails the example that caused it."""
    with httpx.Client(base_url=server.url, timeout=60, transport=httpx.HTTPTransport(retries=0),
                      limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
        yield client


def _check(conn: httpx.Client, path: str, content: bytes, content_type: str = "application/json") -> None:
    with conn.stream("POST", path, content=content, headers={"content-type": content_type}) as r:
        body = r.read().decode()
    assert r.status_code < 500, (r.status_code, body, content[:300])
    if r.status_code != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert body.endswith("data: [DONE]\n\n"), body[-300:]
    else:
        assert json.loads(body)["choices"], body


def _dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes


@FUZZ
@given(body=COMPLETION)
def test_fuzz_completions(conn, body):
    _check(conn, "/v1/completions", _dumps(body))


@FUZZ
@given(body=CHAT)
def test_fuzz_chat_completions(conn, body):
    _check(conn, "/v1/chat/completions", _dumps(body))


@settings(FUZZ, max_examples=60)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       raw=st.binary(max_size=80) | ANY_JSON.map(_dumps).map(lambda b: b[: len(b) // 2])
       | st.sampled_from([b"", b"null", b"[]", b"{}", b'{"prompt": "x"', b"\xff\xfe", b'"\\ud800"']),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_fuzz_malformed_bodies(conn, path, raw, content_type):
    _check(conn, path, raw, content_type)


def test_server_is_alive_and_serving_after_the_fuzz(server, conn):
    assert server.proc.poll() is None
    assert conn.get("/health").status_code == 200
    r = conn.post("/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 3,
                                           "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.log_text()
