#!/usr/bin/env bash
# Installs the Debian packages the local cluster needs when they are missing (needs root):
# iproute2 + nftables (the process node's network, kube-proxy), openssl (PKI), a C compiler (cgo: the
# hydra add-on's in-memory SQLite). Prometheus is built from Go modules with the other binaries:
# Debian's has no Kubernetes service discovery.
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v openssl >/dev/null || need+=(openssl)
command -v make >/dev/null || need+=(make)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "Installing Debian packages: ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
