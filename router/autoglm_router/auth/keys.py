"""The issuer's signing keys: found through its discovery document, fetched from its JWKS, cached.

A token naming a ``kid`` not in the cache triggers one refetch, at most once per
``refresh_interval_s`` (concurrent misses share it): a rotated key is picked up without a restart, and
a flood of made-up ``kid`` values costs the issuer one request per interval. When the issuer cannot be
reached the cached keys stay in use (tokens they signed still verify), an unknown key is refused
(fail closed), and ``status`` says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from autoglm_router.auth.config import ALLOWED_ALGORITHMS, OAuth2Config
from autoglm_router.auth.errors import invalid_token

FetchJSON = Callable[[str], Awaitable[dict[str, Any]]]
KTY = {"RS256": "RSA", "ES256": "EC"}  # the key type each allowed algorithm needs
MAX_DOCUMENT_BYTES = 1 << 20
# What a failed fetch can raise: network, timeout, a body that is not JSON, our own checks.
FETCH_ERRORS = (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError, RecursionError)


class IssuerError(Exception):
    """The issuer answered something we cannot use (HTTP error, not a JSON object, wrong issuer, no keys)."""


class HttpFetcher:
    """GETs JSON documents with aiohttp (one session, made on first use inside the running loop)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise IssuerError(f"GET {url} answered HTTP {resp.status}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise IssuerError(f"GET {url} answered more than {MAX_DOCUMENT_BYTES} bytes")
                chunks.append(chunk)
        data = json.loads(b"".join(chunks))
        if not isinstance(data, dict):
            raise IssuerError(f"GET {url} answered JSON that is not an object")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def usable_keys(jwks: dict[str, Any]) -> list[dict[str, Any]]:
    """The JWKS's signature keys of a type we verify (RSA, EC); others (``use: enc``, ``oct``) are left out."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise IssuerError("the JWKS has no `keys` list")
    return [k for k in keys if isinstance(k, dict) and k.get("kty") in KTY.values() and k.get("use", "sig") == "sig"]


def fits(jwk: dict[str, Any], alg: str) -> bool:
    """Whether a key may verify ``alg``: its type is the algorithm's and its own ``alg`` (if any) agrees."""
    return jwk.get("kty") == KTY[alg] and jwk.get("alg", alg) == alg


class IssuerKeys:
    """The issuer's verification keys (see the module's doc). ``clock`` is monotonic seconds."""

    def __init__(self, config: OAuth2Config, fetch: FetchJSON, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.fetch = fetch
        self.clock = clock
        self.issuer: str | None = None  # the discovery document's ``issuer``: what ``iss`` must equal
        self.jwks_uri: str | None = None
        self._keys: list[dict[str, Any]] = []
        self._prepared: dict[tuple[str, str], PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._error: str | None = None
        self._error_since: float | None = None
        self._lock = asyncio.Lock()

    @property
    def key_ids(self) -> list[str]:
        return [str(k.get("kid", "")) for k in self._keys]

    async def key(self, kid: str | None, alg: str) -> PyJWK:
        """The key that must have signed a token with header ``kid``/``alg`` (``alg`` already one of
        the allowed ones), refetching the JWKS once if it is unknown; ``AuthError`` (401) otherwise."""
        assert alg in ALLOWED_ALGORITHMS
        jwk = self._find(kid, alg)
        if jwk is None:
            await self.refresh()
            jwk = self._find(kid, alg)
        if jwk is None:
            why = f"; the issuer's keys could not be fetched: {self._error}" if self._error else ""
            shown = kid if kid is None or len(kid) <= 64 else kid[:64] + "..."
            raise invalid_token(f"no {alg} signing key {shown!r} at the issuer{why}")
        cache_key = (str(jwk.get("kid", "")), alg)
        if cache_key not in self._prepared:
            try:
                self._prepared[cache_key] = PyJWK(jwk, algorithm=alg)
            except PyJWTError as exc:
                raise invalid_token(f"the issuer's key {kid!r} is not a usable {alg} key: {exc}") from None
        return self._prepared[cache_key]

    def _find(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        if kid is None:  # only unambiguous without a kid: the issuer has a single key for this algorithm
            candidates = [k for k in self._keys if fits(k, alg)]
            return candidates[0] if len(candidates) == 1 else None
        return next((k for k in self._keys if k.get("kid") == kid and fits(k, alg)), None)

    async def refresh(self, force: bool = False) -> bool:
        """Refetch discovery document and JWKS unless the last try is under ``refresh_interval_s`` old
        (``force``: the router's scheduled refresh, which skips that check and does not count toward it, so
        a key the issuer publishes just after it is still fetched when the first token names it). True
        when new keys were stored; a failure keeps the old keys."""
        async with self._lock:
            now = self.clock()
            last = self._attempted_at
            if not force and last is not None and now - last < self.config.refresh_interval_s:
                return False
            if not force:  # a scheduled refresh does not use up the unknown-kid refetch allowance
                self._attempted_at = now
            try:
                issuer, jwks_uri, keys = await self._fetch()
            except (*FETCH_ERRORS, IssuerError) as exc:
                if self._error is None:
                    self._error_since = now
                self._error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return False
            self.issuer, self.jwks_uri = issuer, jwks_uri
            self._keys, self._prepared = keys, {}
            self._fetched_at, self._error, self._error_since = now, None, None
            return True

    async def _fetch(self) -> tuple[str, str, list[dict[str, Any]]]:
        doc = await self.fetch(self.config.discovery_url)
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        if not isinstance(issuer, str) or issuer.rstrip("/") != self.config.issuer_url.rstrip("/"):
            raise IssuerError(f"the discovery document names issuer {issuer!r}, not {self.config.issuer_url!r}")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise IssuerError(f"the discovery document has no usable jwks_uri ({jwks_uri!r})")
        keys = usable_keys(await self.fetch(jwks_uri))
        if not keys:
            raise IssuerError(f"the JWKS at {jwks_uri} holds no RSA or EC signature key")
        return issuer, jwks_uri, keys

    @property
    def status(self) -> str:
        """One line: how many keys, from where, how old; or why the issuer cannot be reached."""
        now = self.clock()
        if self._fetched_at is None:
            if self._error is None:
                return f"keys not fetched yet from {self.config.discovery_url}"
            return f"no keys: the issuer cannot be reached ({self._error}); every token is refused"
        have = f"{len(self._keys)} key(s) fetched {now - self._fetched_at:.0f}s ago from {self.jwks_uri}"
        if self._error is None:
            return f"ok: {have}"
        since = now - (self._error_since or now)
        return (
            f"issuer unreachable for {since:.0f}s ({self._error}); {have} still verify tokens, unknown keys are refused"
        )

    @property
    def error(self) -> str | None:
        """Why the last fetch failed (None: it succeeded, or none was tried yet)."""
        return self._error

    @property
    def fetched(self) -> bool:
        """Whether keys were ever fetched (they are kept through later failures)."""
        return self._fetched_at is not None

    @property
    def reachable(self) -> bool:
        """False while the last fetch failed."""
        return self._error is None
