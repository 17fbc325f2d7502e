#!/usr/bin/env bash
# Copies the Prometheus Operator's PodMonitor and ServiceMonitor CRDs, pinned, from its Go module
# (example/prometheus-operator-crd/) into .cache/prometheus-operator-crds/<version>/ and prints that
# folder. The chart's monitoring templates are validated against them (tests/chart).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=v0.85.0
out=.cache/prometheus-operator-crds/$VERSION
if [[ ! -f $out/.complete ]]; then
  mkdir -p "$out"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json \
        "github.com/prometheus-operator/prometheus-operator@$VERSION" \
        | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  for kind in podmonitors servicemonitors; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out/"
  done
  chmod -R u+w "$out"
  touch "$out/.complete"
fi
echo "$PWD/$out"
