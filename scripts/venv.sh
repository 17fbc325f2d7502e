#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the given extras (default: runtime,router,test,bench,lint,docs).
# Re-running is cheap: a stamp keyed by pyproject.toml skips pip, and pip's cache serves torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-runtime,router,test,bench,lint,docs}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-12)-${extras//,/_}"
if [[ -f $stamp ]]; then exit 0; fi
# torch's CUDA build and its libraries take ~6 GB once unpacked: say so before pip runs out of space.
free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if [[ $extras == *runtime* ]] && ((free_gb < 8)); then
  echo "Only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); installing torch needs ~8 GB. Free some space and rerun." >&2
  exit 1
fi
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
