"""Examples configure the runtime through AUTOGLM_RUNTIME_* variables: each must name a real
setting and parse (a typo would be ignored by the runtime at start, silently)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoglm_runtime.config import RuntimeSettings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_runtime_env_names_real_settings(example, monkeypatch, tmp_path):
    for doc in (d for d in yaml.safe_load_all(example.read_text()) if d):
        env = {
            e["name"]: e["value"]
            for e in doc["spec"].get("runtime", {}).get("env", [])
            if e["name"].startswith("AUTOGLM_RUNTIME_") and "value" in e
        }
        fields = {f"AUTOGLM_RUNTIME_{name.upper()}" for name in RuntimeSettings.model_fields}
        assert set(env) <= fields, set(env) - fields
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        RuntimeSettings(model=tmp_path)  # parses


def test_autoglm_phone_example_matches_the_published_serving_settings():
    doc = yaml.safe_load((REPO / "examples" / "autoglm-phone-9b.yaml").read_text())
    assert doc["spec"]["model"]["uri"] == "hf://zai-org/AutoGLM-Phone-9B"
    assert doc["spec"]["model"]["maxModelLen"] == 25480
    assert doc["spec"]["resources"]["gpus"] == 1
    env = {e["name"]: e["value"] for e in doc["spec"]["runtime"]["env"]}
    assert (
        env["AUTOGLM_RUNTIME_MAX_IMAGE_PIXELS"] == "5000000" and env["AUTOGLM_RUNTIME_MAX_IMAGES_PER_REQUEST"] == "10"
    )
