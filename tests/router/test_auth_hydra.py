"""The router's token checks against a real authorization server: ORY Hydra v2.3.0 (the devcluster
``hydra`` add-on's binary and settings, run on loopback by ``Hydra.start``: no cluster needed, but the Go
build is, hence the ``cluster`` mark). Tokens come from Hydra's token endpoint (client-credentials
grant); the forged ones are made from them. Hydra's key rotation and its death are real too."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
import urllib.request

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from autoglm_router.auth import AuthError, BearerVerifier, OAuth2Config, challenge
from devcluster import build_binaries
from devcluster.addons.hydra import ACCESS_TOKEN_KEYS, Hydra, admin_call

pytestmark = pytest.mark.cluster  # needs the Go build (bin/hydra), not a running cluster


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_client(h: Hydra, audience: str = "autoglm", scope: str = "infer", lifespan: str | None = None) -> tuple:
    c = admin_call(
        h.admin,
        "POST",
        "/admin/clients",
        {
            "client_name": "test",
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_post",
            "audience": [audience],
            "scope": scope,
            "access_token_strategy": "jwt",
        },
    )
    if lifespan:
        admin_call(
            h.admin,
            "PUT",
            f"/admin/clients/{c['client_id']}/lifespans",
            {"client_credentials_grant_access_token_lifespan": lifespan},
        )
    return c["client_id"], c["client_secret"]


def get_token(h: Hydra, client: tuple, audience: str = "autoglm", scope: str = "infer") -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": client[0],
        "client_secret": client[1],
        "audience": audience,
        "scope": scope,
    }
    req = urllib.request.Request(h.issuer + "oauth2/token", data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["access_token"]


def verifier(h: Hydra, **cfg) -> BearerVerifier:
    return BearerVerifier(
        OAuth2Config(
            **{"issuer_url": h.issuer, "audiences": ("autoglm",), "required_scopes": ("infer",), "leeway_s": 1, **cfg}
        )
    )


async def refused(v: BearerVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as exc:
        await v.authenticate("Bearer " + token)
    return exc.value


@pytest.fixture(scope="module")
def bins():
    return build_binaries()


@pytest.fixture(scope="module")
def hydra(bins, tmp_path_factory):
    h = Hydra.start(bins, tmp_path_factory.mktemp("hydra"))
    yield h
    h.stop()


@pytest.fixture
def own_hydra(bins, tmp_path):
    """A Hydra for one test (its keys rotated, or it is stopped)."""
    h = Hydra.start(bins, tmp_path / "hydra")
    yield h
    h.stop()


async def test_a_hydra_token_names_its_client_as_the_user(hydra):
    client = new_client(hydra)
    token = get_token(hydra, client)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    v = verifier(hydra)
    try:
        p = await v.authenticate("Bearer " + token)
        assert p.user == client[0] and "infer" in p.scopes
        assert p.claims["iss"] == hydra.issuer
        assert v.status.startswith("ok: ")
    finally:
        await v.close()


async def test_hydra_tokens_that_must_not_pass(hydra, bins, tmp_path):
    v = verifier(hydra)
    good = get_token(hydra, new_client(hydra))
    head, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    cases: dict[str, str] = {}
    # Expired: a client whose tokens live 1 s, checked after that and the 1 s leeway.
    expired = get_token(hydra, new_client(hydra, lifespan="1s"))
    # Wrong audience: Hydra issues it for "billing" (the client may ask for that audience only).
    cases["wrong audience"] = get_token(hydra, new_client(hydra, audience="billing"), audience="billing")
    # Unsigned, and HS256 "signed" with the issuer's public key (the classic algorithm confusion).
    cases["alg none"] = b64(json.dumps({"alg": "none", "kid": jwt.get_unverified_header(good)["kid"]}).encode()) + (
        f".{payload}."
    )
    jwk = next(k for k in admin_call(hydra.admin, "GET", f"/admin/keys/{ACCESS_TOKEN_KEYS}")["keys"])
    pem = jwt.PyJWK({k: jwk[k] for k in ("kty", "n", "e", "kid")}).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_head = b64(json.dumps({"alg": "HS256", "kid": jwk["kid"], "typ": "JWT"}).encode())
    cases["HS256 with the public key"] = (
        f"{hs_head}.{payload}.{b64(hmac.new(pem, f'{hs_head}.{payload}'.encode(), hashlib.sha256).digest())}"
    )
    cases["tampered payload"] = f"{head}.{b64(json.dumps({**claims, 'sub': 'someone-else'}).encode())}.{sig}"
    # Wrong issuer: a second Hydra holding the same signing key (copied through the admin API), so only
    # the `iss` claim differs.
    other = Hydra.start(bins, tmp_path / "other")
    try:
        admin_call(
            other.admin,
            "PUT",
            f"/admin/keys/{ACCESS_TOKEN_KEYS}",
            admin_call(hydra.admin, "GET", f"/admin/keys/{ACCESS_TOKEN_KEYS}"),
        )
        cases["wrong issuer"] = get_token(other, new_client(other))
        assert jwt.get_unverified_header(cases["wrong issuer"])["kid"] == jwk["kid"]
    finally:
        other.stop()
    time.sleep(max(0.0, jwt.decode(expired, options={"verify_signature": False})["exp"] + 2.5 - time.time()))
    cases["expired"] = expired
    expect = {
        "wrong audience": "token audience is not accepted here",
        "alg none": "token algorithm 'none' is not accepted (only RS256, ES256)",
        "HS256 with the public key": "token algorithm 'HS256' is not accepted (only RS256, ES256)",
        "tampered payload": "token signature does not verify",
        "wrong issuer": "token issuer is not the configured issuer",
        "expired": "token expired",
    }
    try:
        assert (await v.authenticate("Bearer " + good)).user == claims["sub"]  # the same verifier accepts Hydra's
        for name, token in cases.items():
            err = await refused(v, token)
            answer = challenge(err)
            assert (answer.status, err.description) == (401, expect[name]), name
            assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="autoglm", error="invalid_token"')
        # A real token without the required scope: 403 insufficient_scope.
        err = await refused(v, get_token(hydra, new_client(hydra, scope="read"), scope="read"))
        answer = challenge(err)
        assert answer.status == 403
        assert 'error="insufficient_scope"' in answer.headers["WWW-Authenticate"]
        assert answer.headers["WWW-Authenticate"].endswith('scope="infer"')
    finally:
        await v.close()


async def test_a_rotated_key_is_taken_without_a_restart_and_cached_keys_outlive_hydra(own_hydra):
    h = own_hydra
    client = new_client(h)
    v = verifier(h, refresh_interval_s=0.5)
    try:
        before = get_token(h, client)
        assert (await v.authenticate("Bearer " + before)).user == client[0]
        # Rotate: a new key in the access-token set; Hydra signs with the newest.
        admin_call(h.admin, "POST", f"/admin/keys/{ACCESS_TOKEN_KEYS}", {"alg": "RS256", "use": "sig", "kid": "rot-1"})
        time.sleep(0.6)
        after = get_token(h, client)
        assert jwt.get_unverified_header(after)["kid"] == "rot-1"
        assert (await v.authenticate("Bearer " + after)).user == client[0]
        assert "rot-1" in v.keys.key_ids
        # A key made after the verifier's last fetch, then Hydra goes away.
        admin_call(h.admin, "POST", f"/admin/keys/{ACCESS_TOKEN_KEYS}", {"alg": "RS256", "use": "sig", "kid": "rot-2"})
        unseen = get_token(h, client)
        h.stop()
        time.sleep(0.6)
        for token in (before, after):  # cached keys still verify
            assert (await v.authenticate("Bearer " + token)).user == client[0]
        err = await refused(v, unseen)  # an unknown key fails closed, and says why
        assert err.status == 401 and "no RS256 signing key 'rot-2'" in err.description
        assert "could not be fetched" in err.description
        assert v.status.startswith("issuer unreachable for ") and "unknown keys are refused" in v.status
        assert (await v.authenticate("Bearer " + after)).user == client[0]
    finally:
        await v.close()
