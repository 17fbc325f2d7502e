"""HTTPS on both sides of the router: the certificate it serves (``--ssl-certfile`` / ``--ssl-keyfile``, the
runtime's flag names) and how it calls the model pods (``Upstream``: ``--backend-tls``, ``--backend-ca``,
``--backend-server-name``).

The router dials pods by IP (from the EndpointSlices), and a pod's certificate names the Service clients
use, rarely a pod IP, so the name cannot be checked against the address dialled. What is checked instead:

- ``--backend-ca FILE``: the certificates the pods' chain must end in. Every certificate in the file is a
  trust anchor (``VERIFY_X509_PARTIAL_CHAIN``), so a file holding the pods' own certificate pins it: only a
  server holding that certificate's private key is accepted. This is what the operator passes (the
  resource's ``spec.tls`` Secret's ``tls.crt``, which the pods serve). With a CA in the file, any certificate
  that CA issued is accepted unless ``--backend-server-name`` is given too.
- ``--backend-server-name NAME``: the name the pods' certificate must carry (sent as SNI and checked, as
  Istio's DestinationRule ``sni`` / ``subjectAltNames`` do). Required without ``--backend-ca``: the system's
  public CAs vouch for names, not for pods.

There is no switch to turn verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_router.endpoints import Endpoint


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """The context the router serves HTTPS with (TLS 1.2 or later, the Python defaults' ciphers)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certfile), str(keyfile))
    return ctx


def backend_context(ca: Path | None, server_name: str | None) -> ssl.SSLContext:
    """The context the router verifies the pods with (see the module doc)."""
    if ca is None and server_name is None:
        raise ValueError("--backend-tls needs --backend-ca or --backend-server-name (a public CA vouches for names)")
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if ca is not None:
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # any certificate in the file anchors, a pod's own too
    ctx.check_hostname = server_name is not None
    return ctx


@dataclass(frozen=True)
class Upstream:
    """How the router talks to the pods: plain HTTP (the default) or HTTPS with a verifying context. Every
    request to a pod (proxied ones, queue-depth scrapes) takes its URL and ``request_kwargs`` from here."""

    context: ssl.SSLContext | None = None
    server_name: str | None = None

    @classmethod
    def https(cls, ca: Path | None, server_name: str | None) -> Upstream:
        return cls(backend_context(ca, server_name), server_name)

    @property
    def scheme(self) -> str:
        return "http" if self.context is None else "https"

    def url(self, endpoint: Endpoint) -> str:
        return f"{self.scheme}://{endpoint.address}"

    def request_kwargs(self) -> dict[str, Any]:
        """``ssl`` (and ``server_hostname``) for ``aiohttp.ClientSession.request``."""
        if self.context is None:
            return {}
        kw: dict[str, Any] = {"ssl": self.context}
        if self.server_name is not None:
            kw["server_hostname"] = self.server_name
        return kw


PLAIN = Upstream()
