"""The router's pure policies: CHWBL, LeastLoad, session keys and the user-sticky canary."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_router.policies import HashRing, is_canary, load_bound, pick_bounded, pick_least_loaded
from autoglm_router.sessions import canary_user, prompt_key, session_key, validate_session_key

pods_st = st.lists(
    st.from_regex(r"10\.0\.[0-9]{1,2}\.[0-9]{1,3}:8000", fullmatch=True), min_size=1, max_size=8, unique=True
)
keys_st = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60)


# ------------------------------------------------------------------ CHWBL


@given(pods=pods_st, key=st.text(max_size=30))
def test_ring_walk_visits_every_pod_once(pods, key):
    walked = list(HashRing(pods).walk(key))
    assert sorted(walked) == sorted(pods)


@given(pods=pods_st, keys=keys_st)
def test_two_routers_agree_without_shared_state(pods, keys):
    """Two rings built independently (pods given in another order) pick the same pod for every key."""
    a, b = HashRing(pods), HashRing(list(reversed(pods)))
    for key in keys:
        assert pick_bounded(a, key, {}, 1.25) == pick_bounded(b, key, {}, 1.25)


@settings(max_examples=60)
@given(pods=pods_st, keys=keys_st, factor=st.sampled_from([1.0, 1.1, 1.25, 2.0]))
def test_bounded_load_is_respected(pods, keys, factor):
    """Placing requests one by one, no pod ever holds more than ceil(c x mean) after a placement."""
    ring, loads = HashRing(pods), Counter()
    for key in keys:
        pick = pick_bounded(ring, key, loads, factor)
        loads[pick.pod] += 1
        total = sum(loads.values())
        assert loads[pick.pod] <= math.ceil(factor * total / len(pods))


def test_a_session_stays_home_until_its_pod_is_past_the_bound():
    pods = ["a:1", "b:1", "c:1"]
    ring = HashRing(pods)
    home = pick_bounded(ring, "session-1", {}, 1.25)
    assert not home.moved
    # Balanced load: stays home.
    assert pick_bounded(ring, "session-1", {p: 2 for p in pods}, 1.25).pod == home.pod
    # Home pod far past the bound: the next pod clockwise takes it, and says so.
    loads = {p: 0 for p in pods} | {home.pod: 10}
    moved = pick_bounded(ring, "session-1", loads, 1.25)
    assert moved.moved and moved.pod != home.pod
    assert moved.pod == next(p for p in ring.walk("session-1") if p != home.pod)


def test_removing_a_pod_moves_only_its_keys():
    pods = [f"10.0.0.{i}:8000" for i in range(4)]
    full, less = HashRing(pods), HashRing(pods[:-1])
    keys = [f"s{i}" for i in range(2000)]
    moved = [k for k in keys if pick_bounded(full, k, {}, 1.25).pod != pick_bounded(less, k, {}, 1.25).pod]
    assert all(pick_bounded(full, k, {}, 1.25).pod == pods[-1] for k in moved)
    assert 0.15 < len(moved) / len(keys) < 0.35  # about a quarter: that pod's share


def test_keys_spread_over_pods():
    pods = [f"10.0.0.{i}:8000" for i in range(3)]
    ring = HashRing(pods)
    counts = Counter(pick_bounded(ring, f"s{i}", {}, 1.25).pod for i in range(3000))
    assert all(700 < c < 1300 for c in counts.values()), counts


def test_bound_needs_load_factor_at_least_one():
    with pytest.raises(ValueError):
        pick_bounded(HashRing(["a"]), "k", {}, 0.9)
    with pytest.raises(LookupError):
        pick_bounded(HashRing([]), "k", {}, 1.25)
    assert load_bound({"a": 3, "b": 1}, ["a", "b"], 1.25) == math.ceil(1.25 * 5 / 2)


# ------------------------------------------------------------------ LeastLoad


def test_least_loaded_counts_inflight_and_queue():
    pods = ["a", "b", "c"]
    assert pick_least_loaded(pods, {"a": 1, "b": 0, "c": 0}, {"b": 3}) == "c"
    assert pick_least_loaded(pods, {"a": 0, "b": 2, "c": 2}, {"a": 5}) == "b"


def test_least_loaded_ties_take_turns():
    picks = {pick_least_loaded(["a", "b", "c"], {}, {}, turn=t) for t in range(3)}
    assert picks == {"a", "b", "c"}


# ------------------------------------------------------------------ canary


@given(user=st.text(max_size=40), w1=st.integers(0, 100), w2=st.integers(0, 100))
def test_canary_is_monotone_in_the_weight(user, w1, w2):
    lo, hi = sorted((w1, w2))
    assert not (is_canary(user, lo) and not is_canary(user, hi))


@pytest.mark.parametrize("weight", [1, 10, 33, 50, 90])
def test_canary_share_is_the_weight(weight):
    users = [f"user-{i}" for i in range(20000)]
    share = sum(is_canary(u, weight) for u in users) / len(users)
    assert abs(share - weight / 100) < 0.01


def test_canary_ends():
    assert not any(is_canary(f"u{i}", 0) for i in range(1000))
    assert all(is_canary(f"u{i}", 100) for i in range(1000))


# ------------------------------------------------------------------ session keys


def _chat(system: str, user: object, *more: dict) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}, *more]}


def test_prompt_key_is_the_task_not_the_step():
    step1 = _chat("You are a phone agent.", "Open settings")
    step2 = _chat(
        "You are a phone agent.",
        "Open settings",
        {"role": "assistant", "content": "tap(1,2)"},
        {"role": "user", "content": [{"type": "text", "text": "next"}]},
    )
    assert prompt_key(step1) == prompt_key(step2)
    assert prompt_key(step1) != prompt_key(_chat("You are a phone agent.", "Open the camera"))
    assert prompt_key(step1) != prompt_key(_chat("Other system.", "Open settings"))


def test_prompt_key_ignores_images():
    with_image = _chat(
        "sys",
        [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "what is on screen"},
        ],
    )
    other_image = _chat(
        "sys",
        [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
            {"type": "text", "text": "what is on screen"},
        ],
    )
    assert prompt_key(with_image) == prompt_key(other_image) == prompt_key(_chat("sys", "what is on screen"))


def test_completion_prompt_key_uses_the_prefix():
    base = "x" * 300
    assert prompt_key({"prompt": base + "a"}) == prompt_key({"prompt": base + "b"})
    assert prompt_key({"prompt": "a" + base}) != prompt_key({"prompt": "b" + base})


def test_session_key_sources():
    body = {**_chat("s", "u"), "user": "alice"}
    headers = {"x-session-id": "t-1"}
    assert session_key("user", headers, body) == "user:alice"
    assert session_key("header:x-session-id", headers, body) == "header:t-1"
    assert session_key("prompt", headers, body) == "prompt:" + prompt_key(body)
    # Absent source: the prompt's key.
    assert session_key("header:x-other", headers, body) == "prompt:" + prompt_key(body)
    assert session_key("user", {}, _chat("s", "u")) == "prompt:" + prompt_key(body)
    assert canary_user({}, body, "sess") == "alice"
    assert canary_user({"x-autoglm-user": "bob"}, _chat("s", "u"), "sess") == "bob"
    assert canary_user({}, _chat("s", "u"), "sess") == "sess"
    with pytest.raises(ValueError):
        validate_session_key("cookie:x")


def test_a_failed_pod_is_set_aside_unless_it_is_the_last():
    from autoglm_router.endpoints import Endpoint, Revision, Topology
    from autoglm_router.picker import Picker

    a, b = Endpoint("10.0.0.1:8000", "a"), Endpoint("10.0.0.2:8000", "b")
    topo = Topology(Revision("r1", (a, b)))
    picker = Picker()
    picker.failed(a)
    assert {picker.choose(topo, {}, {}).endpoint for _ in range(6)} == {b}
    picker.failed(b)  # both down: still try one rather than refuse
    assert picker.choose(topo, {}, {}).endpoint in (a, b)
    picker.failed(a, cooldown=0)
    assert picker.choose(topo, {}, {}).endpoint == a
