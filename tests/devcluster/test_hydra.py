"""The ``hydra`` add-on: ORY Hydra in the cluster, one issuer URL for the host and for pods. A client
made through ``HYDRA_ADMIN`` gets an RS256 JWT from the issuer's token endpoint, which the discovery
document and the JWKS it names can verify; a pod does the same from its own network namespace."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import jwt
import pytest
import yaml

from devcluster.addons.hydra import admin_call
from tests.devcluster.podutil import http_json, pod
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

# In a pod: discovery document, JWKS and a token from the issuer (argv: issuer, client id, secret).
CLIENT = r"""
import json, sys, time, urllib.parse, urllib.request
issuer, cid, secret = sys.argv[1:4]
out = {}
t = time.monotonic()
with urllib.request.urlopen(issuer + ".well-known/openid-configuration", timeout=5) as r:
    out["discovery"] = json.load(r)
with urllib.request.urlopen(out["discovery"]["jwks_uri"], timeout=5) as r:
    out["jwks"] = json.load(r)
form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": cid, "client_secret": secret,
                               "audience": "autoglm", "scope": "infer"}).encode()
with urllib.request.urlopen(urllib.request.Request(out["discovery"]["token_endpoint"], data=form), timeout=5) as r:
    out["token"] = json.load(r)["access_token"]
out["seconds"] = time.monotonic() - t
print("RESULT " + json.dumps(out), flush=True)
time.sleep(3600)
"""


def new_client(admin: str) -> tuple[str, str]:
    c = admin_call(
        admin,
        "POST",
        "/admin/clients",
        {
            "client_name": "devcluster-test",
            "grant_types": ["client_credentials"],
            "scope": "infer",
            "token_endpoint_auth_method": "client_secret_post",
            "audience": ["autoglm"],
            "access_token_strategy": "jwt",
        },
    )
    return c["client_id"], c["client_secret"]


def verify(token: str, jwks: dict, issuer: str) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))
    return jwt.decode(token, key, algorithms=["RS256"], audience="autoglm", issuer=issuer)


def test_hydra_issues_tokens_its_keys_verify_from_the_host(kube, hydra):
    issuer, admin = hydra["issuer"], hydra["admin"]
    node_ip = kube.network.ranges.node_ip
    assert (issuer, admin) == (f"http://{node_ip}:4444/", f"http://{node_ip}:4445")
    exports = json.loads((kube.dir / "cluster.json").read_text())["exports"]  # other add-ons' lines too
    assert (exports["HYDRA_ISSUER"], exports["HYDRA_ADMIN"]) == (issuer, admin)
    discovery = http_json(issuer + ".well-known/openid-configuration")
    assert discovery["issuer"] == issuer and discovery["jwks_uri"] == issuer + ".well-known/jwks.json"
    assert "client_credentials" in discovery["grant_types_supported"]
    jwks = http_json(discovery["jwks_uri"])
    assert {k["kty"] for k in jwks["keys"]} == {"RSA"} and all("d" not in k for k in jwks["keys"])  # public only

    cid, secret = new_client(admin)
    form = {
        "grant_type": "client_credentials",
        "client_id": cid,
        "client_secret": secret,
        "audience": "autoglm",
        "scope": "infer",
    }
    req = urllib.request.Request(discovery["token_endpoint"], data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.load(resp)
    assert answer["token_type"].lower() == "bearer"
    claims = verify(answer["access_token"], jwks, issuer)
    assert (claims["sub"], claims["client_id"], claims["aud"], claims["scp"]) == (cid, cid, ["autoglm"], ["infer"])


def test_a_pod_reaches_the_same_issuer_and_gets_a_token(kube, hydra, namespace):
    cid, secret = new_client(hydra["admin"])
    client = pod("oauth-client", ["python3", "-c", CLIENT, hydra["issuer"], cid, secret])
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(client))
    line = wait_for(
        lambda: next(
            (x for x in kube.pod_log(namespace, "oauth-client", "main").splitlines() if x.startswith("RESULT ")), None
        ),
        timeout=90,
        message=f"the pod's token (log: {kube.pod_log(namespace, 'oauth-client', 'main')[-2000:]})",
    )
    found = json.loads(line[len("RESULT ") :])
    assert found["discovery"]["issuer"] == hydra["issuer"]
    claims = verify(found["token"], found["jwks"], hydra["issuer"])  # verified with the keys the pod fetched
    assert claims["sub"] == cid
    print(f"pod: discovery + JWKS + token in {found['seconds'] * 1000:.0f} ms")
