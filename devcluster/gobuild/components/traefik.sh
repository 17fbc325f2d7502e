# Traefik: the local cluster's Gateway API data plane (its kubernetesgateway provider), for the
# `gateway` add-on. v3.6.12 is the newest that builds from the module proxy: v3.7's pkg/config/dynamic
# imports a nested module that its go.mod replaces with a folder the module zip lacks. The three
# replaces repeat Traefik's own go.mod (a wrapper module does not inherit them).
TRAEFIK_VERSION=3.6.12
version="traefik v$TRAEFIK_VERSION"
files=(traefik)

build() {
  local out=$1 tv
  cd "$2"
  cat > go.mod <<MOD
module local/traefikbin

go 1.25.0

require github.com/traefik/traefik/v3 v$TRAEFIK_VERSION

replace (
	github.com/abbot/go-http-auth => github.com/containous/go-http-auth v0.4.1-0.20200324110947-a37a7636d23e
	github.com/gorilla/mux => github.com/containous/mux v0.0.0-20250523120546-41b6ec3aed59
	github.com/mailgun/minheap => github.com/containous/minheap v0.0.0-20190809180810-6e71eb837595
)
MOD
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/traefik/traefik/v3/cmd/traefik"\n' > tools.go
  go mod tidy -e >&2
  tv=github.com/traefik/traefik/v3/pkg/version
  go build -p 2 -trimpath -ldflags="-s -w -X $tv.Version=$TRAEFIK_VERSION -X $tv.Codename=local" \
    -o "$out/traefik" github.com/traefik/traefik/v3/cmd/traefik >&2
}
