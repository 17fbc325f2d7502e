"""The OAuth2 settings of a deployment's router (``spec.auth.oauth2``), validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Asymmetric algorithms only: a verifier that accepted HS256 could be fed a token "signed" with the
# issuer's public key, and ``none`` is no signature at all.
ALLOWED_ALGORITHMS = ("RS256", "ES256")


@dataclass(frozen=True)
class OAuth2Config:
    """``issuer_url``: the issuer (``iss``), whose ``/.well-known/openid-configuration`` names its JWKS;
    ``audiences``: a token's ``aud`` must hold one of them; ``required_scopes``: every one must be in the
    token's scopes (``scp`` list or ``scope`` string); ``user_claim``: the claim naming the caller;
    ``leeway_s``: clock skew allowed on ``exp``/``nbf``/``iat``; ``refresh_interval_s``: the least time
    between two fetches of the issuer's keys when a token names an unknown ``kid``."""

    issuer_url: str
    audiences: tuple[str, ...]
    required_scopes: tuple[str, ...] = ()
    user_claim: str = "sub"
    leeway_s: float = 30.0
    refresh_interval_s: float = 10.0
    http_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        url = urlsplit(self.issuer_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
            raise ValueError(f"issuerURL {self.issuer_url!r} is not an http(s) URL without query or fragment")
        if not self.audiences or not all(isinstance(a, str) and a for a in self.audiences):
            raise ValueError("audiences must name at least one audience (non-empty strings)")
        if not all(isinstance(s, str) and s and " " not in s for s in self.required_scopes):
            raise ValueError(f"requiredScopes must be scope names without spaces, not {list(self.required_scopes)}")
        if not self.user_claim:
            raise ValueError("userClaim must name a claim")
        if self.leeway_s < 0 or self.refresh_interval_s < 0 or self.http_timeout_s <= 0:
            raise ValueError("leeway, refresh interval and HTTP timeout must be >= 0 (timeout > 0)")

    @property
    def discovery_url(self) -> str:
        return self.issuer_url.rstrip("/") + "/.well-known/openid-configuration"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **overrides: Any) -> OAuth2Config:
        """From the custom resource's ``spec.auth.oauth2`` (camelCase keys)."""
        return cls(
            issuer_url=spec["issuerURL"],
            audiences=tuple(spec.get("audiences") or ()),
            required_scopes=tuple(spec.get("requiredScopes") or ()),
            user_claim=spec.get("userClaim") or "sub",
            **overrides,
        )
