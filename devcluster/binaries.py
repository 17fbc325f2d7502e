"""The cluster's binaries, built from Go modules by ``gobuild/build.sh`` (cached per component)."""

from __future__ import annotations

import subprocess
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "gobuild" / "build.sh"


class ClusterError(RuntimeError):
    """The cluster could not be built or started; the message says why."""


def build_binaries() -> Path:
    """Build (or reuse from the cache) every component; return the folder holding them all."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ClusterError(
            f"building the cluster's binaries failed (exit {proc.returncode}); see the build output above"
        )
    return Path(proc.stdout.strip().splitlines()[-1])
