#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the given extras (default: runtime,test).
# Re-running is cheap: pip skips what is installed and its cache serves torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-runtime,test}
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${extras//,/_}"
if [[ -f $stamp ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e ".[$extras]"
touch "$stamp"
