"""Smoke test of bench/bench_runtime_gpu.py on CPU: it runs end to end and writes one JSON row per batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_runtime_gpu.py"


def test_bench_runtime_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(SCRIPT),
        "--device", "cpu", "--dtype", "float32", "--size", "tiny",
        "--batches", "1,2", "--new-tokens", "4", "--prompt-tokens", "32", "--warmup-tokens", "3",
        "--cache-dir", str(tmp_path / "models"), "--json", str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "runtime")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["device"] == "cpu"
    assert data["bandwidth"]["measured_GBps"] > 0
    rows = data["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tokens_per_s"] is not None and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["e2e_tokens_per_s"] > 0
        assert r["decode_steps"] >= 1
        assert r["generated_tokens"] == 4 * r["batch"]
        assert r["bound_ms"] > 0 and r["pct_of_bound"] > 0
    assert "batch" in proc.stdout and "% bound" in proc.stdout
