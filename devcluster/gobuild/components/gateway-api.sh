# Gateway API CRDs (standard channel), from the module: HTTPRoutes for traffic splitting.
GATEWAY_API_VERSION=1.6.3
version="gateway-api v$GATEWAY_API_VERSION"
files=(crds)

build() {
  local out=$1 gwdir
  gwdir=$(moddir "sigs.k8s.io/gateway-api@v$GATEWAY_API_VERSION")
  mkdir -p "$out/crds"
  cp "$gwdir/config/crd/standard/"*.yaml "$out/crds/"
  chmod -R u+w "$out/crds"
}
