"""Who may call the model and how: spec.auth, spec.tls, spec.networkPolicy."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from .base import DNS_SUBDOMAIN, LabelValue, SpecModel


class SecretKeyRef(SpecModel):
    """A key of a Secret in this namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(
        default="token", min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$", description="Key within the Secret."
    )


# The router's OAuth2Config checks the same at its start (an http(s) URL without query or fragment).
ISSUER_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"
SCOPE = r"^[!#-\[\]-~]+$"  # RFC 6749 scope-token: printable ASCII without space, '"' and '\\'
CLAIM = r"^[A-Za-z0-9_][-A-Za-z0-9_.:/]*$"


class OAuth2Spec(SpecModel):
    """OAuth2 bearer tokens (JWT access tokens) checked by the router against the issuer's keys."""

    issuer_url: str = Field(
        alias="issuerURL",
        min_length=1,
        max_length=2048,
        pattern=ISSUER_URL,
        description=(
            "The issuer: tokens' `iss` must equal it, and its `/.well-known/openid-configuration` names the "
            "JWKS whose keys (RS256/ES256) sign them. Reached from the router's pods."
        ),
    )
    audiences: tuple[
        Annotated[str, StringConstraints(min_length=1, max_length=256), Field(description="An accepted `aud`.")], ...
    ] = Field(
        min_length=1,
        max_length=16,
        description="A token's `aud` must hold one of these.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    required_scopes: tuple[
        Annotated[str, StringConstraints(max_length=128, pattern=SCOPE), Field(description="A scope name.")], ...
    ] = Field(
        default=(),
        max_length=16,
        description="Scopes every token must hold (`scp` list or `scope` string); a token without one gets 403.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    user_claim: str = Field(
        default="sub",
        max_length=128,
        pattern=CLAIM,
        description=(
            "The claim naming the caller: it replaces the request's `user` for canary assignment and the "
            "`user` session key, and reaches the model pod as `x-autoglm-user`. Default sub."
        ),
    )


class AuthSpec(SpecModel):
    """Client authentication of the OpenAI-compatible API."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret in this namespace holding the API key clients must send as `Authorization: Bearer KEY`. "
            "Omitted: no authentication."
        ),
    )
    oauth2: OAuth2Spec | None = Field(
        default=None,
        description=(
            "Check OAuth2 bearer tokens at the router (needs router.enabled; not with apiKeySecretRef): "
            "a request without a valid token gets 401 (403 for a missing scope) with `WWW-Authenticate` and "
            "never reaches a model pod. status.router.auth says whether the issuer's keys could be fetched."
        ),
    )


class SecretRef(SpecModel):
    """A Secret in this namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")


class TLSSpec(SpecModel):
    """Serving HTTPS."""

    secret_ref: SecretRef = Field(description="The Secret (same namespace) holding tls.crt and tls.key.")


class NetworkPolicySpec(SpecModel):
    """Who may reach the model pods."""

    enabled: bool = Field(default=False, description="Whether to create the NetworkPolicy. Default false.")
    client_labels: dict[str, LabelValue] = Field(
        default_factory=lambda: {"autoglm.io/client": "true"},
        max_length=16,
        description="Labels of the pods (same namespace) allowed to call the model. Default autoglm.io/client=true.",
    )
    monitoring_namespace: str = Field(
        default="monitoring",
        max_length=63,
        description="Namespace whose pods may scrape metrics (by kubernetes.io/metadata.name). Default monitoring.",
    )
