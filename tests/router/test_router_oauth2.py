"""OAuth2 at the router, end to end: a real ORY Hydra issues the tokens (client-credentials grant), the
router process checks them (``--oauth2-issuer``) in front of two REAL runtime processes (a stable and a
canary revision), and the REAL OpenAI client passes the token as its ``api_key``, as Open-AutoGLM's
client does. Refused tokens never reach a pod; each Hydra client (a user) stays on one revision."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from devcluster import build_binaries
from devcluster.addons.hydra import Hydra
from tests.router.test_auth_hydra import get_token, new_client
from tests.router.test_router_runtime import start_router
from tests.runtime.test_server import metric, start_server

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def hydra(tmp_path_factory):
    h = Hydra.start(build_binaries(), tmp_path_factory.mktemp("hydra"))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return tmp_path_factory.mktemp("oauth2-logs")


@pytest.fixture(scope="module")
def router(hydra, logdir, tmp_path_factory):
    from autoglm_runtime.modelmaker import make_model

    model = make_model("tiny", tmp_path_factory.mktemp("tiny-model") / "tiny-glm", seed=0)
    pods = {rev: start_server(model, logdir, "--revision", rev, name=f"pod-{rev}") for rev in ("stable", "canary")}
    router = None
    try:
        router = start_router(
            logdir,
            {},
            f"--backend=stable=pod-stable@127.0.0.1:{pods['stable'].port}",
            f"--backend=canary=pod-canary@127.0.0.1:{pods['canary'].port}",
            "--canary-revision=canary",
            "--canary-weight=50",
            f"--oauth2-issuer={hydra.issuer}",
            "--oauth2-audience=autoglm",
            "--oauth2-scope=infer",
            name="router-oauth2",
        )
        yield router, pods
    finally:
        if router is not None:
            router.stop()
        for srv in pods.values():
            srv.stop()


def pod_requests(pods) -> float:
    return sum(metric(srv.get("/metrics").text, "autoglm_requests_total") for srv in pods.values())


def chat(router, token: str, **kw) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **kw}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(router.url + "/v1/chat/completions", json=body, headers=headers)


def test_a_hydra_token_streams_through_and_bad_ones_never_reach_a_pod(router, hydra):
    router, pods = router
    client = new_client(hydra)
    token = get_token(hydra, client)
    api = openai.OpenAI(base_url=router.url + "/v1", api_key=token, max_retries=0)
    with api.chat.completions.with_streaming_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    ) as r:
        assert r.headers["x-autoglm-revision"] in ("stable", "canary")
        assert [c for c in r.parse() if c.choices]
    before = pod_requests(pods)

    header, payload, _ = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "someone-else"}).encode()).rstrip(b"=").decode()
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode() + f".{payload}."
    no_scope = get_token(hydra, new_client(hydra, scope="other"), scope="other")
    for bad, status in [
        ("", 401),
        ("not-a-jwt", 401),
        (f"{header}.{tampered}.{token.split('.')[2]}", 401),
        (unsigned, 401),
        (no_scope, 403),
    ]:
        resp = chat(router, bad)
        assert resp.status_code == status, (bad[:20], resp.text)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
        assert resp.json()["error"]["type"] in ("authentication_error", "permission_error")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="expired-or-forged", max_retries=0).models.list()
    assert pod_requests(pods) == before, "a refused token reached a pod"
    assert chat(router, token).status_code == 200


def test_each_user_stays_on_one_revision_whatever_its_body_says(router, hydra):
    """The canary's user is the token's ``sub`` (Hydra: the client id): a client that writes another
    ``user`` into its body cannot move itself between revisions."""
    router, _ = router
    seen: dict[str, set[str]] = {}
    for _ in range(12):
        client = new_client(hydra)
        token = get_token(hydra, client)
        for i in range(4):
            resp = chat(router, token, user=f"spoofed-{i}")
            assert resp.status_code == 200, resp.text
            seen.setdefault(client[0], set()).add(resp.headers["x-autoglm-revision"])
    assert all(len(revs) == 1 for revs in seen.values()), seen
    # At 50 %, 12 users all on one side would mean the user is not what picks the revision.
    assert {r for revs in seen.values() for r in revs} == {"stable", "canary"}, seen
