"""The README's first command: `make demo` runs end to end (one-shot mode, its own state dir)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.cluster


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "AUTOGLM_DEMO_ONESHOT": "1", "AUTOGLM_DEMO_STATE": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "export KUBECONFIG=" in out
    assert "tiny   1/1     Healthy" in out, out[-4000:]
    assert "RevisionCreated" in out  # kubectl describe shows the operator's events
    assert re.search(r"answer: '.+'\nusage: \{'prompt_tokens': \d+, 'completion_tokens': [1-9]", out), out[-4000:]
    assert "Stopped." in out
