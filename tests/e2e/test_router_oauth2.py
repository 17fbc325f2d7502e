"""OAuth2 at the router on the process node: `kubectl apply` with spec.router + spec.auth.oauth2 naming the
cluster's ORY Hydra (the ``hydra`` add-on) → the operator's router pod checks tokens in front of a real
runtime pod. The real `openai` client with a Hydra client-credentials token as its api_key streams a
200; a bad or missing token gets 401 + WWW-Authenticate and reaches no pod; status.router.auth shows the
router's keys; during a Router canary each Hydra client (its token's sub, whatever the body's `user`
says) stays on the revision the router's hash gives it."""

from __future__ import annotations

import collections
import json
import urllib.parse
import urllib.request

import httpx
import openai
import pytest

from autoglm_router.policies import is_canary
from devcluster.addons.hydra import admin_call
from tests.e2e.test_dashboard_live import panels_return_data
from tests.e2e.test_runtime_pods import pods, service_ip, tiny
from tests.e2e.test_router import wait_router_serving
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, crd, get, op_env, operator, status,
)
from tests.runtime.test_server import metric

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(600)]

CANARY_WEIGHT = 10


def hydra_client(hydra: dict[str, str]) -> tuple[str, str]:
    c = admin_call(hydra["admin"], "POST", "/admin/clients", {
        "client_name": "e2e", "grant_types": ["client_credentials"], "token_endpoint_auth_method": "client_secret_post",
        "audience": ["autoglm"], "scope": "infer", "access_token_strategy": "jwt"})
    return c["client_id"], c["client_secret"]


def hydra_token(hydra: dict[str, str], client: tuple[str, str]) -> str:
    form = {"grant_type": "client_credentials", "client_id": client[0], "client_secret": client[1],
            "audience": "autoglm", "scope": "infer"}
    req = urllib.request.Request(hydra["issuer"] + "oauth2/token", data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["access_token"]


def pod_requests(kube, namespace: str) -> float:
    """Requests the model pods have seen (their own counter, read from each pod)."""
    total = 0.0
    for p in pods(kube, namespace, "tiny"):
        text = httpx.get(f"http://{p['status']['podIP']}:8000/metrics", timeout=10).text
        total += metric(text, "autoglm_requests_total")
    return total


def test_hydra_tokens_at_the_router_and_a_canary_by_client(kube, namespace, operator, node_models, hydra):
    issuer = hydra["issuer"]
    body = tiny(replicas=1, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 1},
                rollout={"trafficRouting": "Router", "steps": [{"weight": CANARY_WEIGHT, "pause": "1h"}]},
                auth={"oauth2": {"issuerURL": issuer, "audiences": ["autoglm"], "requiredScopes": ["infer"]}})
    apply(kube, namespace, body)

    wait_router_serving(kube, namespace, models=1)
    args = get(kube, namespace, "deployment/tiny-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--oauth2-issuer={issuer}" in args and "--oauth2-scope=infer" in args
    # The router pod fetched Hydra's keys (from its own network namespace) and says so on its pod, which
    # status.router.auth shows.
    wait_for(lambda: (status(kube, namespace, "tiny")["router"].get("auth") or {}).get("reason") == "KeysFetched",
             timeout=90, interval=1, message="status.router.auth KeysFetched")
    auth = status(kube, namespace, "tiny")["router"]["auth"]
    assert auth["issuer"] == issuer and auth["ready"] == "1/1" and "key(s) from" in auth["message"], auth
    url = f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1"

    # The real client, a Hydra token as its api_key: 200, streamed.
    client = hydra_client(hydra)
    token = hydra_token(hydra, client)
    oa = openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=60)
    stream = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason is not None

    # Refused: nothing reaches the model pod.
    seen = pod_requests(kube, namespace)
    bad = openai.OpenAI(base_url=url, api_key=token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
                        max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert exc.value.status_code == 401
    assert exc.value.response.headers["www-authenticate"].startswith('Bearer realm="autoglm", error="invalid_token"')
    r = httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                   timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="autoglm"', r.text
    assert r.json()["error"]["code"] == "missing_token"
    assert pod_requests(kube, namespace) == seen, "a refused request reached a model pod"
    # The dashboard's OAuth2 panels show these checks from Prometheus (test_dashboard_live: the others).
    panels_return_data(kube, namespace, "tiny", oauth2=True)

    # A canary at 10 %: enough Hydra clients that some fall on it (the router's hash of their sub).
    stable = status(kube, namespace, "tiny")["stableRevision"]
    kube.kubectl("patch", "-n", namespace, "agd/tiny", "--type=merge", "-p",
                 '{"spec": {"runtime": {"maxBatchSize": 6}}}')
    users: dict[str, str] = {}  # client id (= the token's sub) → token
    on_canary: set[str] = set()
    while len(on_canary) < 3 or len(users) - len(on_canary) < 3:
        assert len(users) < 200, "Hydra's client ids never landed on the canary"
        cid, secret = hydra_client(hydra)
        users[cid] = hydra_token(hydra, (cid, secret))
        if is_canary(cid, CANARY_WEIGHT):
            on_canary.add(cid)

    def at_weight():
        st = status(kube, namespace, "tiny")
        revs = {rv["name"]: rv for rv in st.get("revisions") or []}
        canary = st.get("canaryRevision")
        return st.get("canaryWeight") == CANARY_WEIGHT and canary and (revs.get(canary) or {}).get("readyReplicas")

    wait_for(at_weight, timeout=240, interval=1, message=f"canary Ready at {CANARY_WEIGHT} %")
    canary_hash = status(kube, namespace, "tiny")["canaryRevision"].rsplit("-", 1)[1]
    stable_hash = stable.rsplit("-", 1)[1]

    def ask(cid: str) -> str:
        # The body's `user` is the same for everyone: the token's sub, not it, picks the revision.
        r = http.post(url + "/chat/completions", headers={"Authorization": f"Bearer {users[cid]}"},
                      json={"model": "tiny", "user": "spoofed", "max_tokens": 1,
                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        return r.headers["x-autoglm-revision"]

    with httpx.Client(timeout=60) as http:
        wait_for(lambda: ask(next(iter(on_canary))) == canary_hash, timeout=30,
                 message="the router read the canary weight")
        seen_by: dict[str, set[str]] = collections.defaultdict(set)
        for _ in range(4):
            for cid in users:
                seen_by[cid].add(ask(cid))
    want = {cid: {canary_hash if cid in on_canary else stable_hash} for cid in users}
    report(f"\nOAuth2 canary at {CANARY_WEIGHT} %: {len(users)} Hydra clients, {len(on_canary)} on the canary, "
           f"{4 * len(users)} requests")
    assert dict(seen_by) == want
