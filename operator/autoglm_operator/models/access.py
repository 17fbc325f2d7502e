"""Who may call the model and how: spec.auth, spec.tls, spec.networkPolicy."""

from __future__ import annotations

from pydantic import Field

from .base import DNS_SUBDOMAIN, LabelValue, SpecModel


class SecretKeyRef(SpecModel):
    """A key of a Secret in this namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(
        default="token", min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$", description="Key within the Secret."
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
