#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy, pinned, into
# $AUTOGLM_BIN_CACHE (default: <repo>/.cache/k8s-bin/<key>). A second run reuses them.
# Prints the bin directory as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)

K8S_VERSION=1.36.3
ETCD_VERSION=3.6.16
KWOK_VERSION=0.8.0
HELM_VERSION=3.22.0
GATEWAY_API_VERSION=1.6.3
PROMETHEUS_VERSION=3.16.0   # Go module github.com/prometheus/prometheus v0.316.0
KEDA_VERSION=2.21.0

key=$(cat "$0" "$here/k8s/main.go" | sha256sum | cut -c1-12)
cache=${AUTOGLM_BIN_CACHE:-$repo/.cache/k8s-bin}
bin="$cache/$key"
stamp="$bin/.complete"
if [[ -f $stamp ]]; then echo "$bin"; exit 0; fi

mkdir -p "$bin" "$bin/stages" "$bin/crds"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
start=$(date +%s)
log() { echo "[build $(( $(date +%s) - start ))s] $*" >&2; }

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl: one binary ---
if [[ ! -x $bin/k8s ]]; then
  log "k8s.io/kubernetes v$K8S_VERSION (wrapper module, staging replaces derived from its go.mod)"
  mkdir -p "$work/k8s"; cp "$here/k8s/main.go" "$work/k8s/"
  cd "$work/k8s"
  go mod init local/k8sbin >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  minor=${K8S_VERSION#1.}
  for m in $(awk '/^\tk8s\.io\/[a-z0-9-]+ v0\.0\.0$/{print $1}' "$gomod"); do
    go mod edit -require="$m@v0.$minor" -replace="$m=$m@v0.$minor"
  done
  go mod tidy >&2
  vpkg=k8s.io/component-base/version
  cpkg=k8s.io/client-go/pkg/version
  IFS=. read -r major kminor _ <<<"$K8S_VERSION"
  ld="-s -w"
  for p in $vpkg $cpkg; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$kminor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -p 2 -trimpath -tags=selinux,notest -ldflags="$ld" -o "$bin/k8s" . >&2
fi
for n in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl; do ln -sf k8s "$bin/$n"; done

# --- etcd: wrapper module (its go.mod replaces siblings with local paths) ---
if [[ ! -x $bin/etcd ]]; then
  log "etcd v$ETCD_VERSION"
  mkdir -p "$work/etcd"; cd "$work/etcd"
  go mod init local/etcdbin >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -p 2 -trimpath -ldflags="-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3 >&2
fi

# --- kwok and helm: plain go install ---
if [[ ! -x $bin/kwok ]]; then
  log "kwok v$KWOK_VERSION"
  GOBIN="$bin" go install -p 2 -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" >&2
fi
kwokdir=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
for s in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
         pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  cp "$kwokdir/kustomize/stage/$s.yaml" "$bin/stages/$(basename "$s").yaml"
done
chmod -R u+w "$bin/stages"
if [[ ! -x $bin/helm ]]; then
  log "helm v$HELM_VERSION"
  hv=helm.sh/helm/v3/internal/version
  # As helm's Makefile: the default Kubernetes version (helm template, lint) follows its client-go.
  hmod=$(go mod download -json "helm.sh/helm/v3@v$HELM_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  cg=$(awk '$1=="k8s.io/client-go"{print $2}' "$hmod"); cg=${cg#v0.}; cgminor=${cg%%.*}
  hk="-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$cgminor"
  hk+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$cgminor"
  GOBIN="$bin" go install -p 2 -trimpath \
    -ldflags="-s -w -X $hv.version=v$HELM_VERSION -X $hv.gitTreeState=clean $hk" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2
fi

# --- Prometheus: Debian's package is built without Kubernetes service discovery, so build it ---
# (no web UI assets: the HTTP API is what the tests and the dashboards use)
if [[ ! -x $bin/prometheus ]]; then
  log "prometheus v$PROMETHEUS_VERSION"
  mkdir -p "$work/prometheus"; cd "$work/prometheus"
  go mod init local/prombin >/dev/null 2>&1
  IFS=. read -r _ pminor ppatch <<<"$PROMETHEUS_VERSION"
  go get "github.com/prometheus/prometheus/cmd/prometheus@v0.3$(printf %02d "$pminor").$ppatch" >&2
  pv=github.com/prometheus/common/version
  go build -p 2 -trimpath -ldflags="-s -w -X $pv.Version=$PROMETHEUS_VERSION -X $pv.Branch=release" \
    -o "$bin/prometheus" github.com/prometheus/prometheus/cmd/prometheus >&2
fi

# --- KEDA: operator + metrics apiserver (adapter), one wrapper module repeating its go.mod's replace ---
if [[ ! -x $bin/keda-operator || ! -x $bin/keda-adapter ]]; then
  log "keda v$KEDA_VERSION"
  mkdir -p "$work/keda"; cd "$work/keda"
  cat > go.mod <<MOD
module local/kedabin

go 1.26.0

require github.com/kedacore/keda/v2 v$KEDA_VERSION

replace github.com/nexus-rpc/nexus-proto-annotations v0.1.0 => github.com/nexus-rpc/nexus-proto-annotations v0.1.1-0.20260629224316-835bd8d49cb4
MOD
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/kedacore/keda/v2/cmd/adapter"\n\t_ "github.com/kedacore/keda/v2/cmd/operator"\n)\n' > tools.go
  go mod tidy -e >&2
  kv=github.com/kedacore/keda/v2/version
  go build -p 2 -trimpath -ldflags="-s -w -X $kv.Version=$KEDA_VERSION" -o "$work/keda/out/" \
    github.com/kedacore/keda/v2/cmd/operator github.com/kedacore/keda/v2/cmd/adapter >&2
  mv "$work/keda/out/operator" "$bin/keda-operator"; mv "$work/keda/out/adapter" "$bin/keda-adapter"
fi
mkdir -p "$bin/keda-crds"
kedadir=$(go mod download -json "github.com/kedacore/keda/v2@v$KEDA_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
cp "$kedadir/config/crd/bases/"*.yaml "$bin/keda-crds/"
chmod -R u+w "$bin/keda-crds"

# --- Gateway API CRDs (for HTTPRoute traffic splitting in later issues) ---
gwdir=$(go mod download -json "sigs.k8s.io/gateway-api@v$GATEWAY_API_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
cp "$gwdir/config/crd/standard/"*.yaml "$bin/crds/" 2>/dev/null || true
chmod -R u+w "$bin/crds"

cat > "$bin/versions.txt" <<V
kubernetes v$K8S_VERSION
etcd v$ETCD_VERSION
kwok v$KWOK_VERSION
helm v$HELM_VERSION
gateway-api v$GATEWAY_API_VERSION
prometheus v$PROMETHEUS_VERSION
keda v$KEDA_VERSION
V
log "done"
touch "$stamp"
# Older builds (other pinned versions) are not needed any more.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$bin"
