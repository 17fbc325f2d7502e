"""The phone-agent benchmark's workload has the real agent's shape (bench/bench_agent.py; no model, no server)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_agent as b  # noqa: E402


def test_the_workload_is_shaped_as_the_phone_agent_sends_it():
    system, agents = b.plan(2, 3, seed=1, think=(0.5, 1.5))
    assert system.startswith("今天的日期是: ") and "星期" in system.splitlines()[0]
    assert 3300 <= len(system) <= 3600 and 1800 <= sum(map(b._is_cjk, system)) <= 2200
    assert b.plan(2, 3, seed=1, think=(0.5, 1.5))[0] == system  # seeded
    seq = agents[0]
    assert len({st.png for a in agents for st in a}) == 6  # a fresh screenshot every step
    msgs = b.messages_of(system, seq, 3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    last = msgs[-1]["content"]
    assert last[0]["type"] == "image_url" and last[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert last[1]["text"].startswith("** Screen Info **")
    assert msgs[1]["content"] == [{"type": "text", "text": seq[0].text}]  # earlier images stripped
    assert all(m["content"].startswith("<think>") and m["content"].endswith("</answer>") for m in msgs[2:5:2])
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(seq[0].png)).size == (1080, 2400)


def test_metrics_are_read_by_name_whatever_the_engine_calls_its_block_gauges():
    text = """# HELP x
autoglm_kv_cache_blocks_used{model="m",revision="r"} 12.0
autoglm_kv_cache_blocks_total{model="m",revision="r"} 64.0
autoglm_prefix_cache_hits_total{model="m",revision="r"} 480.0
autoglm_preemptions_total{model="m",revision="r"} 2.0
autoglm_preemptions_created{model="m",revision="r"} 1.7e9
"""
    m = b.parse_metrics(text)
    assert b.pick(m, "block", "used") == "autoglm_kv_cache_blocks_used"
    assert b.pick(m, "block", "total", exclude=("_created", "used")) == "autoglm_kv_cache_blocks_total"
    assert b.pick(m, "preempt", "_total") == "autoglm_preemptions_total"
    assert m["autoglm_prefix_cache_hits_total"] == 480.0
