# helm: plain go install, its default Kubernetes version (helm template, lint) following its client-go
# as helm's own Makefile sets it.
HELM_VERSION=3.22.0
version="helm v$HELM_VERSION"
files=(helm)

build() {
  local out=$1 hv hmod cg cgminor hk
  hv=helm.sh/helm/v3/internal/version
  hmod=$(modfile "helm.sh/helm/v3@v$HELM_VERSION")
  cg=$(awk '$1=="k8s.io/client-go"{print $2}' "$hmod"); cg=${cg#v0.}; cgminor=${cg%%.*}
  hk="-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$cgminor"
  hk+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$cgminor"
  GOBIN="$out" go install -p 2 -trimpath \
    -ldflags="-s -w -X $hv.version=v$HELM_VERSION -X $hv.gitTreeState=clean $hk" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" >&2
}
