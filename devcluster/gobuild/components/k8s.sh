# kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl: one multi-call binary
# (k8s/main.go) in a wrapper module, the staging replaces derived from k8s.io/kubernetes's go.mod.
K8S_VERSION=1.36.3
version="kubernetes v$K8S_VERSION"
files=(k8s kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl)

build() {  # $1: output folder, $2: scratch folder, $3: this component's input folder
  local out=$1 work=$2
  cp "$3/main.go" "$work/"
  cd "$work"
  go mod init local/k8sbin >/dev/null 2>&1
  local gomod m minor major kminor p ld
  gomod=$(modfile "k8s.io/kubernetes@v$K8S_VERSION")
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  minor=${K8S_VERSION#1.}
  for m in $(awk '/^\tk8s\.io\/[a-z0-9-]+ v0\.0\.0$/{print $1}' "$gomod"); do
    go mod edit -require="$m@v0.$minor" -replace="$m=$m@v0.$minor"
  done
  go mod tidy >&2
  IFS=. read -r major kminor _ <<<"$K8S_VERSION"
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$kminor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -p 2 -trimpath -tags=selinux,notest -ldflags="$ld" -o "$out/k8s" . >&2
  for n in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl; do ln -sf k8s "$out/$n"; done
}
