# etcd: a wrapper module (etcd's own go.mod replaces its sibling modules with local paths).
ETCD_VERSION=3.6.16
version="etcd v$ETCD_VERSION"
files=(etcd)

build() {
  local out=$1
  cd "$2"
  go mod init local/etcdbin >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -p 2 -trimpath -ldflags="-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3 >&2
}
