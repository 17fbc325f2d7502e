"""Certificates, made with ``openssl``: one CA, the apiserver's serving certificate, client
certificates (admin, the operator's audited identity), the aggregation layer's front proxy, and the
service-account signing key."""

from __future__ import annotations

import subprocess
from pathlib import Path

DAYS = "365"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ca(d: Path, name: str, cn: str) -> None:
    """A self-signed CA ``<name>.crt``/``<name>.key`` in ``d``."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        DAYS,
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )


def issue(d: Path, name: str, subject: str, ext: str, ca_name: str = "ca") -> None:
    """A key and a certificate ``<name>.crt`` signed by ``<ca_name>``, with the extensions in ``ext``."""
    (d / f"{name}.ext").write_text(ext)
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca_name}.crt",
        "-CAkey",
        f"{ca_name}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        DAYS,
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def server_names(ips: list[str], domain: str = "cluster.local") -> str:
    """The apiserver's subjectAltName: loopback, the `kubernetes` Service's IP and every name a pod
    may use for it (``kubernetes.default.svc`` ...), and the given addresses (the node's)."""
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{domain}",
    ]
    return ",".join([f"IP:{ip}" for ip in ["127.0.0.1", *ips]] + [f"DNS:{n}" for n in names])


CLIENT = "extendedKeyUsage=clientAuth\n"


def make_pki(d: Path, ips: list[str], operator_user: str) -> None:
    """Everything the control plane needs, in ``d``. ``ips``: the apiserver's addresses besides
    127.0.0.1 (the ``kubernetes`` Service's IP, the node's address)."""
    d.mkdir(parents=True, exist_ok=True)
    ca(d, "ca", "autoglm-local-ca")
    issue(d, "server", "/CN=kube-apiserver", f"subjectAltName={server_names(ips)}\nextendedKeyUsage=serverAuth\n")
    issue(d, "admin", "/O=system:masters/CN=admin", CLIENT)
    issue(d, "operator", f"/O=system:masters/CN={operator_user}", CLIENT)
    # The aggregation layer (APIServices such as KEDA's external metrics): a front-proxy CA and the
    # client certificate the apiserver presents to extension apiservers.
    ca(d, "front-proxy-ca", "autoglm-front-proxy-ca")
    issue(d, "front-proxy-client", "/CN=front-proxy-client", CLIENT, ca_name="front-proxy-ca")
    openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
