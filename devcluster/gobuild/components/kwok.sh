# kwok (fake nodes and their pods) and the stage definitions it needs, from its module.
KWOK_VERSION=0.8.0
version="kwok v$KWOK_VERSION"
files=(kwok stages)

build() {
  local out=$1 s kwokdir
  GOBIN="$out" go install -p 2 -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" >&2
  kwokdir=$(moddir "sigs.k8s.io/kwok@v$KWOK_VERSION")
  mkdir -p "$out/stages"
  for s in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
           pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    cp "$kwokdir/kustomize/stage/$s.yaml" "$out/stages/$(basename "$s").yaml"
  done
  chmod -R u+w "$out/stages"
}
