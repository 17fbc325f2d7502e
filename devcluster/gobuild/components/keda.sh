# KEDA: operator + metrics apiserver (adapter), one wrapper module repeating its go.mod's replace;
# its CRDs from the module.
KEDA_VERSION=2.21.0
version="keda v$KEDA_VERSION"
files=(keda-operator keda-adapter keda-crds)

build() {
  local out=$1 kv kedadir
  cd "$2"
  cat > go.mod <<MOD
module local/kedabin

go 1.26.0

require github.com/kedacore/keda/v2 v$KEDA_VERSION

replace github.com/nexus-rpc/nexus-proto-annotations v0.1.0 => github.com/nexus-rpc/nexus-proto-annotations v0.1.1-0.20260629224316-835bd8d49cb4
MOD
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/kedacore/keda/v2/cmd/adapter"\n\t_ "github.com/kedacore/keda/v2/cmd/operator"\n)\n' > tools.go
  go mod tidy -e >&2
  kv=github.com/kedacore/keda/v2/version
  go build -p 2 -trimpath -ldflags="-s -w -X $kv.Version=$KEDA_VERSION" -o "$2/out/" \
    github.com/kedacore/keda/v2/cmd/operator github.com/kedacore/keda/v2/cmd/adapter >&2
  mv "$2/out/operator" "$out/keda-operator"; mv "$2/out/adapter" "$out/keda-adapter"
  kedadir=$(moddir "github.com/kedacore/keda/v2@v$KEDA_VERSION")
  mkdir -p "$out/keda-crds"
  cp "$kedadir/config/crd/bases/"*.yaml "$out/keda-crds/"
  chmod -R u+w "$out/keda-crds"
}
