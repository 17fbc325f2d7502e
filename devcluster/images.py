"""The process node's image table: image repository → the host folders that make up its "image"
(bound read-only into the container's root, each under an overlay) and the image's environment.
Any tag of a listed repository runs; an image not listed is ``ErrImagePull``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUNTIME_IMAGE = "ghcr.io/autoglm/runtime"  # this checkout's `autoglm-runtime`
ROUTER_IMAGE = "ghcr.io/autoglm/router"  # this checkout's `autoglm-router` (the operator's default router image)
OPERATOR_IMAGE = "autoglm.local/operator"  # this checkout's `autoglm-operator` (the chart's image on proc-0)
HOST_IMAGE = "autoglm.local/host"  # the host's own programs (tests' helper pods)
SYSTEM_FOLDERS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_images(repo: Path = REPO) -> list[dict[str, Any]]:
    """The rows every cluster has: the system folders, the Python the venv uses and this checkout."""
    venv = repo / ".venv"
    python = (
        (venv / "bin" / "python").resolve() if (venv / "bin" / "python").exists() else Path(sys.executable).resolve()
    )
    prefix = str(python.parents[1])
    binds = SYSTEM_FOLDERS + ([prefix] if not prefix.startswith("/usr") else []) + [str(repo)]
    env = {"PATH": f"{venv / 'bin'}:{SYSTEM_PATH}"}
    return [
        {"match": RUNTIME_IMAGE, "binds": binds, "env": env, "entrypoint": ["autoglm-runtime"]},
        {
            "match": ROUTER_IMAGE,
            "binds": binds,
            "entrypoint": ["autoglm-router"],
            "env": {**env, "HOME": "/tmp", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        },
        # As Dockerfile.operator: HOME on the writable /tmp, unbuffered logs, no bytecode written.
        {
            "match": OPERATOR_IMAGE,
            "binds": binds,
            "entrypoint": ["autoglm-operator"],
            "env": {**env, "HOME": "/tmp", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        },
        {"match": HOST_IMAGE, "binds": binds, "env": env},
    ]
