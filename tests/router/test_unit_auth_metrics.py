"""OAuth2 in the router app (in-process, fake issuer documents, fake pods): how checks are counted and how
the issuer's state is shown. A verified user never becomes a raw label: requests are counted in 64 hashed
buckets; refusals by a fixed set of results; ``/status`` and two gauges say whether the keys can be fetched."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from autoglm_router.auth import AuthError, BearerVerifier, OAuth2Config
from autoglm_router.endpoints import Topology
from autoglm_router.metrics import AUTH_RESULTS, USER_BUCKETS, user_bucket
from tests.router.test_proxy import CHAT, Pod, _chat, _pods, make_router  # noqa: F401 - fixture
from tests.router.test_unit_auth import ISSUER, Issuer


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in the exposition text."""
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


@pytest.fixture
async def setup(make_router):  # noqa: F811 - the fixture imported above
    issuer = Issuer()
    config = OAuth2Config(issuer_url=ISSUER, audiences=("autoglm",), required_scopes=("infer",))
    verifier = BearerVerifier(config, fetch=issuer.fetch)
    pod = Pod("p0")
    router, _ = await make_router(Topology(await _pods(pod)), verifier=verifier, keys_refresh_s=3600)
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> str:
            async with session.get(router.make_url(path)) as r:
                assert r.status == 200
                return await r.text()

        async def chat(token: str | None, user: str = "ignored") -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with session.post(router.make_url(CHAT), json=_chat(user), headers=headers) as r:
                await r.read()
                return r.status

        yield issuer, verifier, pod, chat, get


def test_user_buckets_are_bounded_stable_and_spread():
    users = [f"client-{i}" for i in range(5000)]
    buckets = {user_bucket(u) for u in users}
    assert buckets == {str(b) for b in range(USER_BUCKETS)}  # 5,000 users, still 64 values
    assert all(user_bucket(u) == user_bucket(u) for u in users[:50])
    assert len({user_bucket(u) for u in users[:8]}) > 1  # a hash, not a constant


async def test_users_are_counted_in_buckets_and_refusals_by_result(setup):
    issuer, _, pod, chat, get = setup
    users = [f"client-{i:03d}" for i in range(200)]
    for u in users:
        assert await chat(issuer.token(sub=u)) == 200
    assert await chat(issuer.token(sub=users[0])) == 200  # one user twice: the same bucket counts 2
    hits = pod.hits
    assert await chat(None) == 401
    assert await chat("not-a-jwt") == 401
    assert await chat(issuer.token(aud=["someone-else"])) == 401
    assert await chat(issuer.token(scp=["read"])) == 403
    assert pod.hits == hits  # refused requests reached no pod

    text = await get("/metrics")
    assert not any(u in text for u in users)  # no user id anywhere in the exposition
    by_bucket = samples(text, "autoglm_router_user_requests_total")
    assert 1 < len(by_bucket) <= USER_BUCKETS
    assert sum(by_bucket.values()) == 201
    assert by_bucket[f'{{bucket="{user_bucket(users[0])}"}}'] >= 2
    results = samples(text, "autoglm_router_auth_total")
    assert set(results) == {f'{{result="{r}"}}' for r in AUTH_RESULTS}
    assert results == {
        '{result="authenticated"}': 201,
        '{result="missing_token"}': 1,
        '{result="invalid_token"}': 2,
        '{result="insufficient_scope"}': 1,
    }


async def test_status_says_when_the_issuer_is_unreachable_and_cached_keys_still_verify(setup):
    issuer, verifier, _, chat, get = setup
    assert await chat(issuer.token()) == 200
    status = json.loads(await get("/status"))["auth"]
    assert status["reachable"] is True and status["keys"] == 1 and status["message"].startswith("ok: 1 key(s)")
    metrics = await get("/metrics")
    assert samples(metrics, "autoglm_router_oauth2_issuer_reachable") == {"": 1.0}
    assert samples(metrics, "autoglm_router_oauth2_keys") == {"": 1.0}

    issuer.down = True
    assert not await verifier.keys.refresh(force=True)  # what the periodic refresh does
    status = json.loads(await get("/status"))["auth"]
    assert status["reachable"] is False and status["keys"] == 1
    assert "issuer unreachable" in status["message"] and "Cannot connect" in status["message"]
    metrics = await get("/metrics")
    assert samples(metrics, "autoglm_router_oauth2_issuer_reachable") == {"": 0.0}
    assert await chat(issuer.token()) == 200  # cached key
    issuer.add_rsa("r2")
    assert await chat(issuer.token(kid="r2")) == 401  # unknown key, issuer down: fail closed


async def test_without_oauth2_status_says_so_and_no_auth_series(make_router):  # noqa: F811
    router, _ = await make_router(Topology(await _pods(Pod("p0"))))
    async with aiohttp.ClientSession() as s:
        async with s.get(router.make_url("/status")) as r:
            assert await r.json() == {"auth": None}
        async with s.post(router.make_url(CHAT), json=_chat("alice")) as r:
            assert r.status == 200
        async with s.get(router.make_url("/metrics")) as r:
            text = await r.text()
    assert not samples(text, "autoglm_router_auth_total") and not samples(text, "autoglm_router_user_requests_total")


async def test_the_pod_condition_is_written_on_change_only_and_says_why():
    """``PodConditionReporter`` against a small fake API server: a strategic merge patch of the pod's
    status with one condition; written again only when the keys' state changes."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from autoglm_router.auth.report import CONDITION, PodConditionReporter
    from autoglm_router.kube import KubeConnection

    patches: list[tuple[str, str, dict]] = []

    async def patch(request: web.Request) -> web.Response:
        patches.append((request.path, request.headers["Content-Type"], await request.json()))
        return web.json_response({})

    app = web.Application()
    app.router.add_patch("/api/v1/namespaces/{ns}/pods/{pod}/status", patch)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        issuer = Issuer()
        v = BearerVerifier(OAuth2Config(issuer_url=ISSUER, audiences=("autoglm",)), fetch=issuer.fetch)
        report = PodConditionReporter(KubeConnection(str(server.make_url("")), None, False), "ns1", "router-0").report
        await report(v.keys)  # nothing fetched yet
        await v.keys.refresh(force=True)
        await report(v.keys)
        await report(v.keys)  # same state: no write
        issuer.down = True
        await v.keys.refresh(force=True)
        await report(v.keys)
    finally:
        await server.close()
    assert [p[0] for p in patches] == ["/api/v1/namespaces/ns1/pods/router-0/status"] * 3
    assert {p[1] for p in patches} == {"application/strategic-merge-patch+json"}
    conds = [p[2]["status"]["conditions"][0] for p in patches]
    assert [(c["type"], c["status"], c["reason"]) for c in conds] == [
        (CONDITION, "False", "NoKeys"),
        (CONDITION, "True", "KeysFetched"),
        (CONDITION, "False", "IssuerUnreachable"),
    ]
    assert "Cannot connect" in conds[2]["message"] and "1 cached key(s) still verify" in conds[2]["message"]


async def test_a_key_published_just_after_the_scheduled_fetch_is_still_fetched_for_its_first_token():
    """Hydra makes its signing key on the first token it issues: the router's start-up fetch can find
    none, and the first token's unknown kid must still trigger a refetch (the scheduled refresh does not
    count toward the unknown-kid rate limit)."""
    issuer = Issuer()
    issuer.keys.clear()
    v = BearerVerifier(OAuth2Config(issuer_url=ISSUER, audiences=("autoglm",)), fetch=issuer.fetch)
    assert not await v.keys.refresh(force=True)  # start-up: no key yet
    issuer.rsa = issuer.add_rsa("r1")
    assert (await v.verify(issuer.token())).user == "alice"
    fetches = len(issuer.fetches)
    for i in range(5):  # made-up kids right after: still at most one refetch per interval
        issuer.add_rsa(f"x{i}")
        with pytest.raises(AuthError):
            await v.verify(issuer.token(kid=f"x{i}"))
    assert len(issuer.fetches) == fetches
