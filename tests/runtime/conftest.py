"""Fixtures for runtime tests: one tiny GLM checkpoint per session, built locally (no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~1M-parameter random-weight GLM checkpoint with tokenizer and chat template."""
    from autoglm_runtime.modelmaker import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny-model") / "tiny-glm", seed=0)


@pytest.fixture(scope="session")
def tiny_vl_model_dir(tmp_path_factory) -> Path:
    """A ~1M-parameter random-weight GLM-4.1V-shaped checkpoint (Glm4vForConditionalGeneration)."""
    from autoglm_runtime.modelmaker_vl import make_vl_model

    return make_vl_model("tiny-vl", tmp_path_factory.mktemp("tiny-vl") / "tiny-vl", seed=0)
