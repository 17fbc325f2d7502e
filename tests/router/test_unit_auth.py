"""Bearer-token checks with keys made here (no issuer process: the issuer's two documents come from a
fake fetcher, the clock is a counter). The same cases against the real Hydra: test_auth_hydra.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from autoglm_router.auth import AuthError, BearerVerifier, OAuth2Config, bearer_token, challenge, token_scopes

ISSUER = "https://issuer.test/"
JWKS_URI = "https://issuer.test/.well-known/jwks.json"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """Keys, documents and a fetcher that serves them (``down`` makes it fail like a dead issuer)."""

    def __init__(self) -> None:
        self.keys: dict[str, object] = {}
        self.fetches: list[str] = []
        self.down = False
        self.issuer = ISSUER
        self.rsa = self.add_rsa("r1")

    def add_rsa(self, kid: str):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = key
        return key

    def add_ec(self, kid: str):
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[kid] = key
        return key

    def jwks(self) -> dict:
        out = []
        for kid, key in self.keys.items():
            algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = algo.to_jwk(key.public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    async def fetch(self, url: str) -> dict:
        self.fetches.append(url)
        if self.down:
            raise aiohttp.ClientConnectionError("Cannot connect to host issuer.test:443")
        if url == ISSUER.rstrip("/") + "/.well-known/openid-configuration":
            return {"issuer": self.issuer, "jwks_uri": JWKS_URI}
        assert url == JWKS_URI
        return self.jwks()

    def token(self, kid: str = "r1", alg: str | None = None, **claims) -> str:
        key = self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": ["autoglm"],
            "sub": "alice",
            "client_id": "app-1",
            "scp": ["infer"],
            "exp": now + 300,
            "nbf": now - 1,
            "iat": now - 1,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def verifier(issuer: Issuer, clock: Clock, **cfg) -> BearerVerifier:
    config = OAuth2Config(**{"issuer_url": ISSUER, "audiences": ("autoglm",), "leeway_s": 5, **cfg})
    return BearerVerifier(config, fetch=issuer.fetch, clock=clock)


async def refused(v: BearerVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as exc:
        await v.verify(token)
    return exc.value


async def test_a_valid_token_names_its_user_and_scopes(issuer, clock):
    v = verifier(issuer, clock, required_scopes=("infer",))
    p = await v.authenticate("Bearer " + issuer.token(scope="read write"))
    assert p.user == "alice" and p.scopes == {"infer", "read", "write"}
    assert (await verifier(issuer, clock, user_claim="client_id").verify(issuer.token())).user == "app-1"
    assert v.status.startswith("ok: 1 key(s) fetched 0s ago from " + JWKS_URI)


async def test_es256_is_accepted_and_a_key_of_the_other_type_is_not(issuer, clock):
    issuer.add_ec("e1")
    v = verifier(issuer, clock)
    assert (await v.verify(issuer.token("e1"))).user == "alice"
    # An RS256 header naming the EC key's kid (signed by the RSA key): no RS256 key by that kid.
    forged = jwt.encode(
        {"iss": ISSUER, "aud": "autoglm", "sub": "x", "exp": time.time() + 60},
        issuer.rsa,
        algorithm="RS256",
        headers={"kid": "e1"},
    )
    assert "no RS256 signing key 'e1'" in (await refused(v, forged)).description


@pytest.mark.parametrize(
    ("claims", "words"),
    [
        # Times relative to when the test runs (parameters are made at collection, maybe minutes before).
        ({"exp": -60}, "token expired"),
        ({"nbf": +60}, "not valid yet"),
        ({"aud": ["someone-else"]}, "audience"),
        ({"iss": "https://evil.test/"}, "issuer"),
        ({"exp": None}, "required claim"),
        ({"sub": None}, "no 'sub' claim"),
    ],
)
async def test_claims_that_do_not_fit_are_invalid_token(issuer, clock, claims, words):
    claims = {k: int(time.time()) + v if k in ("exp", "nbf") and v is not None else v for k, v in claims.items()}
    err = await refused(verifier(issuer, clock), issuer.token(**claims))
    assert (err.status, err.error) == (401, "invalid_token") and words in err.description


async def test_clock_skew_within_the_leeway_passes(issuer, clock):
    v = verifier(issuer, clock, leeway_s=30)
    assert (await v.verify(issuer.token(exp=int(time.time()) - 10))).user == "alice"


async def test_unsigned_hs256_with_the_public_key_and_tampered_tokens_are_refused(issuer, clock):
    v = verifier(issuer, clock)
    good = issuer.token()
    head, payload, sig = good.split(".")
    none = b64(json.dumps({"alg": "none", "kid": "r1", "typ": "JWT"}).encode()) + "." + payload + "."
    assert "'none' is not accepted" in (await refused(v, none)).description
    pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_head = b64(json.dumps({"alg": "HS256", "kid": "r1", "typ": "JWT"}).encode())
    hs_sig = b64(hmac.new(pem, f"{hs_head}.{payload}".encode(), hashlib.sha256).digest())
    assert "'HS256' is not accepted" in (await refused(v, f"{hs_head}.{payload}.{hs_sig}")).description
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered = b64(json.dumps({**claims, "sub": "mallory"}).encode())
    assert (await refused(v, f"{head}.{tampered}.{sig}")).description == "token signature does not verify"
    for junk in ("not-a-jwt", "a.b", "W10.e30.", b64(b"[" * 5000) + ".e30.", "!!.e30.x", b64(b"\xff") + ".e30.x"):
        assert (await refused(v, junk)).description == "token is not a well-formed JWT", junk
    assert (await refused(v, f"{head}.{b64(b'x' * 20000)}.{sig}")).description == "token longer than 16384 characters"


async def test_a_missing_scope_is_403_insufficient_scope(issuer, clock):
    v = verifier(issuer, clock, required_scopes=("infer", "admin"))
    err = await refused(v, issuer.token())
    assert (err.status, err.error, err.scope) == (403, "insufficient_scope", ("infer", "admin"))
    assert err.description == "token lacks scope(s) admin"


async def test_a_rotated_key_is_fetched_once_and_unknown_kids_are_rate_limited(issuer, clock):
    v = verifier(issuer, clock, refresh_interval_s=10)
    await v.verify(issuer.token())
    assert len(issuer.fetches) == 2  # discovery + JWKS
    issuer.add_rsa("r2")
    clock.t += 11
    assert (await v.verify(issuer.token("r2"))).user == "alice"
    assert len(issuer.fetches) == 4
    # A made-up kid: one refetch, then none within the interval, and it fails closed.
    issuer.add_rsa("r3")
    bogus = issuer.token("r3")
    del issuer.keys["r3"]
    clock.t += 11
    for _ in range(5):
        assert "no RS256 signing key 'r3'" in (await refused(v, bogus)).description
    assert len(issuer.fetches) == 6
    # Within the interval even a real new key waits for the next allowed fetch...
    issuer.add_rsa("r4")
    await refused(v, issuer.token("r4"))
    clock.t += 11
    assert (await v.verify(issuer.token("r4"))).user == "alice"  # ...and is taken after it


async def test_concurrent_misses_share_one_fetch(issuer, clock):
    import asyncio

    v = verifier(issuer, clock)
    results = await asyncio.gather(*(v.verify(issuer.token()) for _ in range(8)))
    assert {p.user for p in results} == {"alice"} and len(issuer.fetches) == 2


async def test_an_unreachable_issuer_keeps_cached_keys_and_fails_closed_on_new_ones(issuer, clock):
    v = verifier(issuer, clock, refresh_interval_s=1)
    token = issuer.token()
    await v.verify(token)
    issuer.down = True
    issuer.add_rsa("r2")
    clock.t += 5
    err = await refused(v, issuer.token("r2"))
    assert "could not be fetched: ClientConnectionError" in err.description
    assert (await v.verify(token)).user == "alice"
    clock.t += 20
    assert v.status.startswith("issuer unreachable for 20s (ClientConnectionError: Cannot connect")
    assert "1 key(s) fetched 25s ago" in v.status and "unknown keys are refused" in v.status
    issuer.down = False
    clock.t += 2
    assert (await v.verify(issuer.token("r2"))).user == "alice"
    assert v.status.startswith("ok: 2 key(s)")


async def test_an_issuer_never_reached_refuses_everything_and_says_so(issuer, clock):
    issuer.down = True
    v = verifier(issuer, clock)
    await refused(v, issuer.token())
    assert v.status.startswith("no keys: the issuer cannot be reached")


async def test_a_discovery_document_for_another_issuer_is_not_trusted(issuer, clock):
    issuer.issuer = "https://evil.test/"
    v = verifier(issuer, clock)
    assert "names issuer 'https://evil.test/'" in (await refused(v, issuer.token())).description


def test_the_challenge_headers_and_body():
    r = challenge(AuthError(401, "invalid_token", 'token "expired"'))
    assert r.status == 401
    assert r.headers == {
        "WWW-Authenticate": 'Bearer realm="autoglm", error="invalid_token", error_description="token \'expired\'"'
    }
    assert r.body == {
        "error": {"message": 'token "expired"', "type": "authentication_error", "param": None, "code": "invalid_token"}
    }
    r = challenge(AuthError(403, "insufficient_scope", "token lacks scope(s) b", scope=("a", "b")))
    assert r.status == 403 and r.headers["WWW-Authenticate"].endswith('scope="a b"')
    assert r.body["error"]["type"] == "permission_error"
    with pytest.raises(AuthError) as exc:
        bearer_token(None)
    r = challenge(exc.value)
    assert (r.status, r.headers, r.body["error"]["code"]) == (
        401,
        {"WWW-Authenticate": 'Bearer realm="autoglm"'},
        "missing_token",
    )


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, None),
        ("", None),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", "invalid_token"),
        ("Bearer a b", "invalid_token"),
    ],
)
def test_authorization_headers_that_carry_no_usable_token(header, error):
    with pytest.raises(AuthError) as exc:
        bearer_token(header)
    assert (exc.value.status, exc.value.error) == (401, error)


def test_bearer_scheme_is_case_insensitive_and_scopes_merge():
    assert bearer_token("bearer abc.def.ghi") == "abc.def.ghi"
    assert token_scopes({"scp": ["a", 3], "scope": "b c"}) == {"a", "b", "c"}


def test_config_from_the_custom_resource_and_its_errors():
    c = OAuth2Config.from_spec(
        {"issuerURL": "http://10.1.255.2:4444/", "audiences": ["autoglm"], "requiredScopes": ["infer"]}
    )
    assert (c.user_claim, c.required_scopes) == ("sub", ("infer",))
    assert c.discovery_url == "http://10.1.255.2:4444/.well-known/openid-configuration"
    with pytest.raises(ValueError, match="audiences"):
        OAuth2Config("https://i.test", ())
    with pytest.raises(ValueError, match="not an http"):
        OAuth2Config("issuer.test", ("a",))
    with pytest.raises(ValueError, match="requiredScopes"):
        OAuth2Config("https://i.test", ("a",), required_scopes=("a b",))


async def test_the_http_fetcher_refuses_errors_junk_and_huge_documents():
    """The default fetcher against a real HTTP server on loopback (aiohttp.web)."""
    from aiohttp import web

    from autoglm_router.auth.keys import MAX_DOCUMENT_BYTES, HttpFetcher, IssuerError

    async def handler(request: web.Request) -> web.StreamResponse:
        kind = request.path.strip("/")
        if kind == "error":
            return web.Response(status=500)
        if kind == "junk":
            return web.Response(body=b"<html>")
        if kind == "list":
            return web.json_response([1])
        if kind == "huge":  # chunked: no Content-Length to go by
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(MAX_DOCUMENT_BYTES // 65536 + 2):
                await resp.write(b" " * 65536)
            return resp
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{kind}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fetch = HttpFetcher(5)
    try:
        base = f"http://127.0.0.1:{port}/"
        assert await fetch(base + "fine") == {"ok": True}
        with pytest.raises(IssuerError, match="HTTP 500"):
            await fetch(base + "error")
        with pytest.raises(json.JSONDecodeError):
            await fetch(base + "junk")
        with pytest.raises(IssuerError, match="not an object"):
            await fetch(base + "list")
        with pytest.raises(IssuerError, match="more than 1048576 bytes"):
            await fetch(base + "huge")
    finally:
        await fetch.close()
        await runner.cleanup()


async def test_a_kid_the_client_chose_cannot_break_the_header(issuer, clock):
    v = verifier(issuer, clock)
    token = jwt.encode(
        {"sub": "x"}, issuer.rsa, algorithm="RS256", headers={"kid": 'evil"\r\nSet-Cookie: a=b' + "k" * 500}
    )
    answer = challenge(await refused(v, token))
    value = answer.headers["WWW-Authenticate"]
    assert all(" " <= c <= "~" for c in value) and "\r" not in value and len(value) < 300
    assert "no RS256 signing key 'evil''r'nSet-Cookie: a=bkkk" in value  # quotes and backslashes shown as '
    raw = challenge(AuthError(401, "invalid_token", "a\r\nb\u00e9")).headers["WWW-Authenticate"]
    assert raw.endswith('error_description="a??b?"')
