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


def test_router_bench_ratios_compare_hits_with_one_replica_and_ttft_with_the_service():
    """bench_router_agent.py's ratios: SessionAffinity's hit tokens over the single replica's, its TTFT p50
    over the Service's, from the records and the replicas' summed /metrics deltas."""
    import bench_router_agent as ra

    def result(name: str, ttfts: list[float]) -> b.SystemResult:
        records = [b.Record(agent=i, step=1 + i % 2, ttft=t, e2e=t, completion_tokens=4, prompt_tokens=10,
                            cached_tokens=0, expected_prompt_tokens=10, shared_with_previous=0)
                   for i, t in enumerate(ttfts)]
        return b.SystemResult(name, True, wall_s=1.0, records=records)

    def extra(hits: float) -> dict:
        return {"replicas": 3, "prefix_hits": hits, "prefix_queries": 1000.0, "sessions_on_one_pod": 1,
                "sessions": 2, "moved_by_load": None, "retries": None}

    results = {"single": (result("single", [4.0, 4.0]), extra(800)),
               "Service": (result("Service", [2.0, 2.0]), extra(500)),
               "SessionAffinity": (result("SessionAffinity", [1.0, 1.0]), extra(720))}
    rows = {what: measured for what, measured, _ in ra.ratios(results)}
    assert rows["SessionAffinity: prefix-cache hit tokens / single replica's"].endswith("= 0.90x")
    assert rows["SessionAffinity: TTFT p50 / the Service's (all steps)"].endswith("= 0.50x")
    assert rows["Service: prefix-cache hit tokens / single replica's"].endswith("= 0.62x")
    assert "72.0%" in ra.summary_table(results)
    # Tasks of 8 steps or more: their second half too (here steps 1 and 2 only: step >= 2 is that half of 2).
    halves = {what: measured for what, measured, _ in ra.ratios(results, steps=8)}
    assert "SessionAffinity: TTFT p50 / the Service's (steps >= 5)" not in halves  # no record that late
    assert halves["SessionAffinity: TTFT p50 / the Service's (steps >= 2)"].endswith("= 0.50x")
