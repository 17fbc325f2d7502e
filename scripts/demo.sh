#!/usr/bin/env bash
# `make demo`: a local AutoGLMDeployment end to end, on this machine, no Docker.
#  1. starts the local cluster (real apiserver/controller-manager/scheduler/kube-proxy, kwok fake GPU
#     nodes, the process node proc-0 where CPU pods really run as processes, Prometheus)
#  2. installs the CRD, runs the operator locally, makes the embedded tiny model in the node's /models
#  3. applies examples/tiny-cpu.yaml unchanged: its pod runs the real runtime on proc-0, and the demo
#     asks it one chat question through the Service's ClusterIP
# AUTOGLM_DEMO_ONESHOT=1 stops everything after printing instead of waiting for Ctrl-C;
# AUTOGLM_DEMO_STATE=DIR keeps its cluster, model and logs there (default .cache/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
state=${AUTOGLM_DEMO_STATE:-$root/.cache/demo}
mkdir -p "$state"
export PATH="$root/.venv/bin:$PATH"
pids=()
cleanup() {
  echo; echo "Stopping the demo..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  python3 -m devcluster down --dir "$state/cluster" >/dev/null || true
  echo "Stopped."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the local control plane"
up=$(python3 -m devcluster up --dir "$state/cluster")
echo "$up"
export KUBECONFIG="$state/cluster/kubeconfig"
bin=$(bash devcluster/gobuild/build.sh)
export PATH="$bin:$PATH"

step "Installing the CRD"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established crd/autoglmdeployments.autoglm.io --timeout=60s

step "Making the embedded tiny model (the node's /models is $state/cluster/models)"
model="$state/cluster/models/tiny"
[[ -f $model/config.json ]] || autoglm-runtime make-model --size tiny --out "$model"

step "Starting the operator (logs: $state/operator.log)"
autoglm-operator >"$state/operator.log" 2>&1 &
pids+=($!)

step "Applying examples/tiny-cpu.yaml"
kubectl apply -f examples/tiny-cpu.yaml
for _ in $(seq 1 360); do
  phase=$(kubectl get agd tiny -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [[ $phase == Healthy ]] && break
  sleep 0.5
done
kubectl get agd
echo
kubectl describe agd tiny
echo
kubectl get deploy,svc,pods -o wide -l app.kubernetes.io/instance=tiny

step "Asking the model through its Service"
ip=$(kubectl get svc tiny -o jsonpath='{.spec.clusterIP}')
pod=$(kubectl get pods -l app.kubernetes.io/instance=tiny -o jsonpath='{.items[0].metadata.name}')
echo "POST http://$ip:8000/v1/chat/completions {\"messages\":[{\"role\":\"user\",\"content\":\"Hello, who are you?\"}]}"
curl -fsS --retry 5 --retry-all-errors "http://$ip:8000/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"tiny","messages":[{"role":"user","content":"Hello, who are you?"}],"max_tokens":24,"temperature":0}' |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", repr(r["choices"][0]["message"]["content"])); print("usage:", r["usage"])'
echo "(the tiny model has random weights: the answer is gibberish, but it came from the runtime in pod $pod)"
prom=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["prometheus"])' "$state/cluster/cluster.json")

step "The demo is running"
cat <<MSG
  export KUBECONFIG=$KUBECONFIG        # then: kubectl get agd; kubectl describe agd tiny
  export PATH=$bin:\$PATH               # kubectl and helm built for this cluster
  model endpoint: http://$ip:8000/v1  (the Service's ClusterIP; OpenAI-compatible)
  Prometheus:     $prom  (e.g. $prom/api/v1/query?query=autoglm_requests_running)
  pod logs:       $state/cluster/procnode/logs/  (kubectl logs does not work on the process node)
MSG
if [[ ${AUTOGLM_DEMO_ONESHOT:-0} == 1 ]]; then exit 0; fi
echo "Press Ctrl-C to stop everything."
while true; do sleep 3600; done
