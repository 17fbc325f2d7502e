"""Cost of the router's bearer-token check per request, keys cached (`autoglm_router.auth`).

Tokens from a real ORY Hydra (the devcluster ``hydra`` add-on's binary on loopback: its RS256 key,
client-credentials grant) and, for comparison, tokens signed here with an RSA-2048 and an ES256 (P-256)
key behind a fake issuer. For each: ``BearerVerifier.authenticate`` (header parse, key lookup, PyJWT
signature and claim checks, scopes) timed per call, p50/p99/mean, after warm-up, in one asyncio loop on
one core; next to it a bare ``jwt.decode`` with the key at hand (the library's own cost), and the
ratio of the two (what our wrapping adds). Also the first check of a verifier (cold: discovery + JWKS
fetched from Hydra).

    .venv/bin/python bench/bench_auth.py [--n 5000] [--no-hydra] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "router"))

from autoglm_router.auth import BearerVerifier, OAuth2Config  # noqa: E402
from devcluster import build_binaries  # noqa: E402
from devcluster.addons.hydra import Hydra, admin_call  # noqa: E402

LOCAL_ISSUER = "https://issuer.test/"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def time_calls(fn, n: int) -> list[float]:
    for _ in range(min(200, n)):
        await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def row(name: str, ours: list[float], bare: list[float]) -> dict:
    us = 1e6
    r = {
        "token": name,
        "p50_us": percentile(ours, 0.5) * us,
        "p99_us": percentile(ours, 0.99) * us,
        "mean_us": statistics.fmean(ours) * us,
        "bare_decode_p50_us": percentile(bare, 0.5) * us,
    }
    r["ratio_vs_bare_p50"] = r["p50_us"] / r["bare_decode_p50_us"]
    return r


async def bench_token(name: str, v: BearerVerifier, token: str, n: int) -> dict:
    header = "Bearer " + token
    await v.authenticate(header)  # keys fetched and prepared
    key = await v.keys.key(jwt.get_unverified_header(token).get("kid"), jwt.get_unverified_header(token)["alg"])
    alg = key.algorithm_name
    aud, iss = list(v.config.audiences), v.keys.issuer

    async def ours() -> None:
        await v.authenticate(header)

    async def bare() -> None:
        jwt.decode(token, key, algorithms=[alg], audience=aud, issuer=iss)

    return row(name, await time_calls(ours, n), await time_calls(bare, n))


def local_case(kind: str) -> tuple[BearerVerifier, str]:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    algo, alg = (RSAAlgorithm, "RS256") if kind == "rsa" else (ECAlgorithm, "ES256")
    jwks = {"keys": [{**algo.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "use": "sig"}]}

    async def fetch(url: str) -> dict:
        if url.endswith("openid-configuration"):
            return {"issuer": LOCAL_ISSUER, "jwks_uri": LOCAL_ISSUER + "jwks.json"}
        return jwks

    now = int(time.time())
    claims = {"iss": LOCAL_ISSUER, "aud": ["autoglm"], "sub": "u", "scp": ["infer"], "exp": now + 3600, "iat": now}
    token = jwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})
    cfg = OAuth2Config(LOCAL_ISSUER, ("autoglm",), required_scopes=("infer",))
    return BearerVerifier(cfg, fetch=fetch), token


def hydra_token(h: Hydra) -> str:
    c = admin_call(
        h.admin,
        "POST",
        "/admin/clients",
        {
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_post",
            "audience": ["autoglm"],
            "scope": "infer",
            "access_token_strategy": "jwt",
        },
    )
    form = {
        "grant_type": "client_credentials",
        "client_id": c["client_id"],
        "client_secret": c["client_secret"],
        "audience": "autoglm",
        "scope": "infer",
    }
    req = urllib.request.Request(h.issuer + "oauth2/token", data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["access_token"]


async def main_async(args) -> list[dict]:
    rows = []
    if not args.no_hydra:
        with tempfile.TemporaryDirectory(prefix="bench-auth-") as d:
            h = Hydra.start(build_binaries(), Path(d))
            try:
                token = hydra_token(h)
                v = BearerVerifier(OAuth2Config(h.issuer, ("autoglm",), required_scopes=("infer",)))
                t = time.perf_counter()
                await v.authenticate("Bearer " + token)
                cold_ms = (time.perf_counter() - t) * 1000
                with urllib.request.urlopen(h.issuer + ".well-known/jwks.json", timeout=10) as resp:
                    jwks = json.load(resp)["keys"]
                jwk = next(k for k in jwks if k.get("kid") == jwt.get_unverified_header(token)["kid"])
                bits = len(jwt.utils.base64url_decode(jwk["n"])) * 8
                r = await bench_token(f"Hydra RS256 ({bits}-bit key)", v, token, args.n)
                r["first_check_cold_ms"] = cold_ms
                rows.append(r)
                await v.close()
            finally:
                h.stop()
    for kind, name in (("rsa", "local RS256 (2048-bit key)"), ("ec", "local ES256 (P-256)")):
        v, token = local_case(kind)
        rows.append(await bench_token(name, v, token, args.n))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="timed checks per token kind")
    ap.add_argument("--no-hydra", action="store_true", help="local keys only (no Go build needed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    print(
        f"# token check per request, cached keys, n={args.n}, {platform.python_version()}, "
        f"PyJWT {jwt.__version__}, {platform.machine()}"
    )
    print(f"{'token':32} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'bare decode p50':>16} {'ours/bare':>9}")
    for r in rows:
        print(
            f"{r['token']:32} {r['p50_us']:8.0f} {r['p99_us']:8.0f} {r['mean_us']:8.0f} "
            f"{r['bare_decode_p50_us']:16.0f} {r['ratio_vs_bare_p50']:9.2f}"
        )
        if "first_check_cold_ms" in r:
            print(f"  first check of a new verifier (discovery + JWKS from Hydra): {r['first_check_cold_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
