#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the given extras (default: runtime,test,bench,lint,docs).
# Re-running is cheap: a stamp keyed by pyproject.toml skips pip, and pip's cache serves torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-runtime,test,bench,lint,docs}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-12)-${extras//,/_}"
if [[ -f $stamp ]]; then exit 0; fi
echo "Installing autoglm[$extras] into .venv (the first run downloads torch: several GB)..." >&2
[[ -x .venv/bin/python ]] || python3 -m venv .venv
log=.venv/install.log
if ! { .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e ".[$extras]"; } >"$log" 2>&1; then
  tail -40 "$log" >&2
  echo "pip install failed; full log in $log" >&2
  exit 1
fi
rm -f .venv/.installed-*
touch "$stamp"
