# CoreDNS with its kubernetes plugin: cluster DNS for the process node's pods. A wrapper module whose
# main (coredns/main.go) imports the plugins we use; versions of everything else follow CoreDNS's go.mod.
COREDNS_VERSION=1.15.0
version="coredns v$COREDNS_VERSION"
files=(coredns)

build() {
  local out=$1
  cp "$3/main.go" "$2/"
  cd "$2"
  go mod init local/corednsbin >/dev/null 2>&1
  go get "github.com/coredns/coredns@v$COREDNS_VERSION" >&2
  go mod tidy >&2
  go build -p 2 -trimpath -ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=v$COREDNS_VERSION" \
    -o "$out/coredns" . >&2
}
