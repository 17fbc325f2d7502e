"""Pure unit tests of the server's parts (no model, no process): settings, protocol, metrics, memory limits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from autoglm_runtime.cli import build_parser, settings_from_args
from autoglm_runtime.config import RuntimeSettings, format_validation_error
from autoglm_runtime.metrics import RequestTimer, RuntimeMetrics
from autoglm_runtime.server.protocol import ChatCompletionRequest, CompletionRequest

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
    a.on_step(SimpleNamespace(batch_size=2, num_prefill_tokens=0, step_seconds=0.002))
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


def test_engine_gauges_carry_only_the_current_revision():
    m = RuntimeMetrics("m", "r1")
    m.bind_stats(lambda: SimpleNamespace(num_running=2, num_waiting=5, kv_cache_usage=0.25))
    assert 'autoglm_requests_waiting{model="m",revision="r1"} 5.0' in m.render().decode()
    m.set_labels(revision="r2")
    text = m.render().decode()
    assert 'autoglm_requests_waiting{model="m",revision="r2"} 5.0' in text
    for gauge in ("autoglm_requests_running", "autoglm_requests_waiting", "autoglm_kv_cache_usage_ratio"):
        assert f'{gauge}{{model="m",revision="r1"}}' not in text, gauge
    assert 'autoglm_requests_total{model="m",revision="r1",status="success"} 0.0' in text  # counters stay


def test_gauges_survive_a_dead_engine():
    m = RuntimeMetrics("m", "r1")

    def dead():
        raise RuntimeError("engine loop died")

    m.bind_stats(dead)
    assert 'autoglm_requests_running{model="m",revision="r1"} 0.0' in m.render().decode()


# ------------------------------------------------------------------ cgroup memory

GiB = 1 << 30


def _fake_cgroup(root, version: int, limit: str, usage: int, inactive: int = 0):
    if version == 2:
        (root / "memory.max").write_text(limit + "\n")
        (root / "memory.current").write_text(f"{usage}\n")
        (root / "memory.stat").write_text(f"anon {usage}\ninactive_file {inactive}\nactive_file 0\n")
    else:
        (root / "memory").mkdir()
        (root / "memory" / "memory.limit_in_bytes").write_text(limit + "\n")
        (root / "memory" / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (root / "memory" / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")
    return root


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_limit_is_read(tmp_path, version):
    from autoglm_runtime.memory import cgroup_memory

    cg = cgroup_memory(_fake_cgroup(tmp_path, version, str(4 * GiB), usage=3 * GiB, inactive=GiB))
    assert cg is not None and (cg.version, cg.limit) == (version, 4 * GiB)
    assert cg.available == 2 * GiB  # limit - (usage - reclaimable page cache)


@pytest.mark.parametrize("version, limit", [(2, "max"), (1, "9223372036854771712")])
def test_no_cgroup_limit_means_host_memory(tmp_path, version, limit):
    from autoglm_runtime.memory import cgroup_memory, cpu_available_memory

    root = _fake_cgroup(tmp_path, version, limit, usage=GiB)
    assert cgroup_memory(root) is None
    assert cgroup_memory(tmp_path / "no-cgroup-fs") is None
    import psutil

    assert cpu_available_memory(root) > 0.5 * psutil.virtual_memory().available


def test_kv_cache_sizing_reads_the_cgroup_limit(tmp_path, monkeypatch):
    """The KV cache check and reload's fit check use the container's limit, not the host's memory."""
    import torch

    from autoglm_runtime.memory import CGROUP_ROOT_ENV
    from autoglm_runtime.model_runner import available_memory

    monkeypatch.setenv(CGROUP_ROOT_ENV, str(_fake_cgroup(tmp_path, 2, str(GiB), usage=GiB - 5 * 2**20)))
    assert available_memory(torch.device("cpu")) == 5 * 2**20


def test_tls_settings_need_both_files_and_a_usable_pair(tmp_path) -> None:
    import subprocess

    import pytest
    from pydantic import ValidationError

    from autoglm_runtime.config import RuntimeSettings

    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(ValidationError, match="both ssl_certfile and ssl_keyfile"):
        RuntimeSettings(model=model, ssl_certfile=tmp_path / "c.pem")
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ValidationError, match="cannot use the TLS certificate"):
        RuntimeSettings(model=model, ssl_certfile=tmp_path / "c.pem", ssl_keyfile=tmp_path / "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem",
                    "-days", "1", "-subj", "/CN=x"], cwd=tmp_path, check=True, capture_output=True)
    s = RuntimeSettings(model=model, ssl_certfile=tmp_path / "c.pem", ssl_keyfile=tmp_path / "k.pem")
    assert s.ssl_certfile == tmp_path / "c.pem"
