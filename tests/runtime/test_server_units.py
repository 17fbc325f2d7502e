"""Pure unit tests of the server's parts (no model, no process): settings, protocol, stop strings, metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from autoglm_runtime.cli import build_parser, settings_from_args
from autoglm_runtime.config import RuntimeSettings, format_validation_error
from autoglm_runtime.metrics import RequestTimer, RuntimeMetrics
from autoglm_runtime.server.protocol import ChatCompletionRequest, CompletionRequest
from autoglm_runtime.server.serving import StopChecker

pytestmark = pytest.mark.runtime


def test_flags_override_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_RUNTIME_MODEL", str(tmp_path))
    monkeypatch.setenv("AUTOGLM_RUNTIME_PORT", "9000")
    monkeypatch.setenv("AUTOGLM_RUNTIME_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("AUTOGLM_RUNTIME_API_KEY", "from-env")
    s = settings_from_args(build_parser().parse_args(["serve", "--port", "8123"]))
    assert (s.port, s.max_batch_size, s.model, s.api_key) == (8123, 4, tmp_path, "from-env")
    assert s.served_model_name == tmp_path.name
    key = tmp_path / "key"
    key.write_text("from-file\n")
    s = settings_from_args(build_parser().parse_args(["serve", "--api-key-file", str(key), "--log-level", "DEBUG"]))
    assert s.api_key == "from-file" and s.log_level == "debug"


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(ValidationError) as err:
        RuntimeSettings(model=tmp_path, max_batch_size=0, device="tpu")
    msg = format_validation_error(err.value)
    assert "max_batch_size" in msg and "AUTOGLM_RUNTIME_MAX_BATCH_SIZE" in msg and "device" in msg
    with pytest.raises(ValidationError, match="cannot read api_key_file"):
        RuntimeSettings(model=tmp_path, api_key_file=tmp_path / "missing")


@pytest.mark.parametrize("stops, pieces, expected, stopped", [
    ([], ["ab", "cd"], "abcd", False),
    (["cd"], ["ab", "c", "d", "ef"], "ab", True),
    (["xyz"], ["abx", "y", "q"], "abxyq", False),
    (["\n\n", "END"], ["one\n", "\ntwo"], "one", True),
    (["b"], ["abc"], "a", True),
])
def test_stop_checker_never_emits_part_of_a_stop_string(stops, pieces, expected, stopped):
    checker, out, hit = StopChecker(stops), [], False
    for piece in pieces:
        text, hit = checker.feed(piece)
        out.append(text)
        for s in stops:  # nothing emitted so far may contain a stop string
            assert s not in "".join(out)
        if hit:
            break
    if not hit:
        out.append(checker.flush())
    assert ("".join(out), hit) == (expected, stopped)


@pytest.mark.parametrize("body", [
    {"prompt": "x", "n": 2}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "temperature": -1},
    {"prompt": "x", "top_p": 1.5}, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, {"prompt": []},
    {"prompt": "x", "logprobs": 21}, {"prompt": "x", "echo": True}, {"prompt": ["a", "b"]},
])
def test_completion_request_rejects(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_requests_accept_openai_shapes():
    r = CompletionRequest.model_validate({"prompt": ["hello"], "stop": "x", "priority": -3, "unknown": 1})
    assert r.prompt == "hello" and r.stop_list == ["x"] and r.priority == -3
    assert CompletionRequest.model_validate({"prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    c = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5})
    assert c.requested_max_tokens == 5 and c.messages[0].to_template() == {"role": "user", "content": "ab"}


def test_metrics_use_their_own_registry_and_read_engine_stats():
    a, b = RuntimeMetrics("m", "r1"), RuntimeMetrics("m", "r2")
    a.bind_stats(lambda: SimpleNamespace(num_running=3, num_waiting=2, kv_cache_usage=0.5))
    a.on_step(SimpleNamespace(batch_size=4, num_prefill_tokens=10, step_seconds=0.01))
    a.on_step(2, 0, 0.002)
    timer = RequestTimer(a, arrival=0.0)
    timer.tokens(0.1, 1)
    timer.tokens(0.2, 2)
    timer.done(0.3, prompt_tokens=7, completion_tokens=3, status="success")
    text = a.render().decode()
    assert 'autoglm_requests_running{model="m",revision="r1"} 3.0' in text
    assert 'autoglm_requests_waiting{model="m",revision="r1"} 2.0' in text
    assert 'autoglm_kv_cache_usage_ratio{model="m",revision="r1"} 0.5' in text
    assert 'autoglm_batch_size_count{model="m",revision="r1"} 2.0' in text
    assert 'autoglm_inter_token_latency_seconds_count{model="m",revision="r1"} 2.0' in text
    assert 'autoglm_requests_total{model="m",revision="r1",status="success"} 1.0' in text
    assert 'autoglm_prompt_tokens_total{model="m",revision="r1"} 7.0' in text
    assert "r1" not in b.render().decode()  # no shared global registry
