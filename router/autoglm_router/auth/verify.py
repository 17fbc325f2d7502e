"""Bearer-token verification: ``Authorization`` header → the calling user, or an ``AuthError``."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from autoglm_router.auth.config import ALLOWED_ALGORITHMS, OAuth2Config
from autoglm_router.auth.errors import insufficient_scope, invalid_token, missing_token
from autoglm_router.auth.keys import FetchJSON, HttpFetcher, IssuerKeys

MAX_TOKEN_CHARS = 16384  # far above any access token; bounds the work a junk header can cause

# PyJWT's refusals, in words a client can act on (the most specific first: several subclass others).
REASONS: list[tuple[type[jwt_errors.PyJWTError], str]] = [
    (jwt_errors.ExpiredSignatureError, "token expired"),
    (jwt_errors.ImmatureSignatureError, "token not valid yet (nbf/iat in the future)"),
    (jwt_errors.InvalidAudienceError, "token audience is not accepted here"),
    (jwt_errors.InvalidIssuerError, "token issuer is not the configured issuer"),
    (jwt_errors.InvalidSignatureError, "token signature does not verify"),
    (jwt_errors.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt_errors.InvalidAlgorithmError, "token algorithm does not match its key"),
    (jwt_errors.DecodeError, "token is not a well-formed JWT"),
]


@dataclass(frozen=True)
class Principal:
    """Who called: ``user`` is the configured claim's value (``sub`` by default)."""

    user: str
    scopes: frozenset[str]
    claims: Mapping[str, Any]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header. No header, or another scheme: 401
    without an error code (RFC 6750 §3.1); ``Bearer`` with nothing usable after it: ``invalid_token``."""
    if not authorization:
        raise missing_token()
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise missing_token()
    token = token.strip()
    if not token or " " in token:
        raise invalid_token("malformed Authorization header (expected `Bearer <token>`)")
    return token


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from Hydra's ``scp`` (a list) and RFC 9068's ``scope`` (a space-separated string)."""
    scopes: set[str] = set()
    for name in ("scp", "scope"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(s for s in value if isinstance(s, str))
    return frozenset(scopes)


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, to pick the key: only the first segment is decoded (PyJWT's
    ``get_unverified_header`` decodes all three, and ``jwt.decode`` does it again; that base64 check
    was ~40 % of a check's time). ``jwt.decode`` then parses the whole token strictly, this header too."""
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid_token(f"token longer than {MAX_TOKEN_CHARS} characters")
    segments = token.split(".")
    if len(segments) != 3:
        raise invalid_token("token is not a well-formed JWT")
    try:
        header = json.loads(base64.urlsafe_b64decode(segments[0] + "=" * (-len(segments[0]) % 4)))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise invalid_token("token is not a well-formed JWT") from None
    if not isinstance(header, dict):
        raise invalid_token("token is not a well-formed JWT")
    return header


def reason(exc: jwt_errors.PyJWTError) -> str:
    for cls, words in REASONS:
        if isinstance(exc, cls):
            return f"{words}: {exc}" if cls is jwt_errors.MissingRequiredClaimError else words
    return f"invalid token: {exc}"


class BearerVerifier:
    """Checks access tokens against ``config`` with keys from the issuer (``IssuerKeys``).

    ``await verifier.authenticate(request.headers.get("Authorization"))`` returns a ``Principal`` or
    raises ``AuthError``; ``challenge(err)`` is the HTTP answer. ``status`` says how the keys stand.
    ``fetch`` replaces the HTTP client (unit tests); ``close()`` closes the default one."""

    def __init__(
        self, config: OAuth2Config, fetch: FetchJSON | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._http: HttpFetcher | None = None
        if fetch is None:
            self._http = fetch = HttpFetcher(config.http_timeout_s)
        self.keys = IssuerKeys(config, fetch, clock)

    @property
    def status(self) -> str:
        return self.keys.status

    async def authenticate(self, authorization: str | None) -> Principal:
        return await self.verify(bearer_token(authorization))

    async def verify(self, token: str) -> Principal:
        header = unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGORITHMS:
            raise invalid_token(f"token algorithm {alg!r} is not accepted (only {', '.join(ALLOWED_ALGORITHMS)})")
        if kid is not None and not isinstance(kid, str):
            raise invalid_token("token kid is not a string")
        key = await self.keys.key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(self.config.audiences),
                issuer=self.keys.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt_errors.PyJWTError as exc:
            raise invalid_token(reason(exc)) from None
        user = claims.get(self.config.user_claim)
        if not isinstance(user, str) or not user:
            raise invalid_token(f"token has no {self.config.user_claim!r} claim naming the user")
        scopes = token_scopes(claims)
        missing = [s for s in self.config.required_scopes if s not in scopes]
        if missing:
            raise insufficient_scope(self.config.required_scopes, missing)
        return Principal(user=user, scopes=scopes, claims=claims)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
