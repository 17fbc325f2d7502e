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

Rotation (``TLSFiles``): the files are read again every few seconds; a changed certificate and key are
served from the next handshake on, and certificates added to ``--backend-ca`` are trusted beside the old
ones (pods started before the rotation still serve the old certificate) until the router restarts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_router.endpoints import Endpoint

log = logging.getLogger("autoglm_router.tls")
RELOAD_SECONDS = 10.0  # the kubelet refreshes a mounted Secret within about a minute; this adds little


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


def _read(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None  # mid-swap or gone: try again next time


class ServedCertificate:
    """The certificate the router serves, replaceable while it listens: ``context`` is the listener's, and
    its SNI callback (called at every handshake, with or without SNI) hands the handshake the latest
    loaded context. A new pair is loaded into a fresh context, so one that does not load (a certificate
    without its key yet) leaves the one in use untouched."""

    def __init__(self, certfile: Path, keyfile: Path) -> None:
        self.certfile, self.keyfile = certfile, keyfile
        self.context = server_context(certfile, keyfile)
        self.current = self.context
        self.context.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self.current is not self.context:
            conn.context = self.current

    def reload(self) -> None:
        self.current = server_context(self.certfile, self.keyfile)


@dataclass
class TLSFiles:
    """Follows the certificate files as they change on disk (a Secret rotated by cert-manager or by hand)."""

    served: ServedCertificate | None
    upstream: Upstream
    ca: Path | None
    _seen: dict[str, bytes | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._seen = self._contents()

    def _contents(self) -> dict[str, bytes | None]:
        cert, key = (self.served.certfile, self.served.keyfile) if self.served is not None else (None, None)
        return {"cert": _read(cert), "key": _read(key), "ca": _read(self.ca)}

    def check(self) -> None:
        """Load what changed since the last look; what does not load (a half-written pair) is tried again
        at the next look, and what loaded before stays in use."""
        now = self._contents()
        if self.served is not None and (now["cert"], now["key"]) != (self._seen["cert"], self._seen["key"]):
            try:
                self.served.reload()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.warning("Failed to load the rotated certificate, certfile=%s error=%s", self.served.certfile, exc)
                now["cert"], now["key"] = self._seen["cert"], self._seen["key"]
            else:
                log.info("Loaded rotated certificate, certfile=%s", self.served.certfile)
        ctx = self.upstream.context
        if ctx is not None and now["ca"] is not None and now["ca"] != self._seen["ca"]:
            try:  # added to the store: the old certificates stay trusted
                ctx.load_verify_locations(cadata=now["ca"].decode())
            except (OSError, ValueError) as exc:
                log.warning("Failed to load the rotated backend CA, file=%s error=%s", self.ca, exc)
                now["ca"] = self._seen["ca"]
            else:
                log.info("Added rotated backend certificates beside the old, file=%s", self.ca)
        self._seen = now

    async def follow(self, period: float = RELOAD_SECONDS) -> None:
        while True:
            await asyncio.sleep(period)
            self.check()
