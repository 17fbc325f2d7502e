# ORY Hydra: the OAuth2 / OpenID Connect server of the `hydra` add-on (client-credentials tokens as RS256
# JWTs, in-memory storage). A wrapper module, as for KEDA: Hydra's go.mod replaces gobuffalo/pop with
# ORY's fork and a dependency's replaces are ignored, so the wrapper repeats it (without it,
# persistence/sql fails: "p.conn.Store.SQLDB undefined"). cgo and the `sqlite` tag give `DSN=memory`.
HYDRA_VERSION=2.3.0
version="hydra v$HYDRA_VERSION"
files=(hydra)

build() {
  local out=$1
  cd "$2"
  cat > go.mod <<MOD
module local/hydrabin

go 1.26.0

require github.com/ory/hydra/v2 v$HYDRA_VERSION

replace github.com/gobuffalo/pop/v6 => github.com/ory/pop/v6 v6.2.1-0.20241121111754-e5dfc0f3344b
MOD
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/ory/hydra/v2"\n' > tools.go
  go mod tidy -e >&2
  CGO_ENABLED=1 go build -p 2 -trimpath -tags sqlite \
    -ldflags="-s -w -X github.com/ory/hydra/v2/driver/config.Version=v$HYDRA_VERSION" \
    -o "$out/hydra" github.com/ory/hydra/v2 >&2
}
