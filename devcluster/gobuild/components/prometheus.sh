# Prometheus: Debian's package is built without Kubernetes service discovery, so build it (no web UI
# assets: the HTTP API is what the tests and the dashboards use).
PROMETHEUS_VERSION=3.16.0   # Go module github.com/prometheus/prometheus v0.316.0
version="prometheus v$PROMETHEUS_VERSION"
files=(prometheus)

build() {
  local out=$1 pminor ppatch pv
  cd "$2"
  go mod init local/prombin >/dev/null 2>&1
  IFS=. read -r _ pminor ppatch <<<"$PROMETHEUS_VERSION"
  go get "github.com/prometheus/prometheus/cmd/prometheus@v0.3$(printf %02d "$pminor").$ppatch" >&2
  pv=github.com/prometheus/common/version
  go build -p 2 -trimpath -ldflags="-s -w -X $pv.Version=$PROMETHEUS_VERSION -X $pv.Branch=release" \
    -o "$out/prometheus" github.com/prometheus/prometheus/cmd/prometheus >&2
}
