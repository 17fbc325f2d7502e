"""Fixtures for runtime tests: one tiny GLM checkpoint per session, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~1M-parameter random-weight GLM checkpoint with tokenizer and chat template."""
    from autoglm_runtime.modelmaker import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny-model") / "tiny-glm", seed=0)
