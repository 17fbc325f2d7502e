"""Kubeconfig files (client-certificate auth) for the cluster's users and components."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_kubeconfig(path: Path, server: str, pki: Path, user: str = "admin") -> None:
    """A kubeconfig for ``server`` with ``<pki>/<user>.crt`` as the client certificate."""
    path.write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: autoglm-local
          cluster: {{server: "{server}", certificate-authority: "{pki / "ca.crt"}"}}
        users:
        - name: admin
          user: {{client-certificate: "{pki / f"{user}.crt"}", client-key: "{pki / f"{user}.key"}"}}
        contexts:
        - name: autoglm-local
          context: {{cluster: autoglm-local, user: admin, namespace: default}}
        current-context: autoglm-local
        """)
    )
