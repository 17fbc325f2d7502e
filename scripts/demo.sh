#!/usr/bin/env bash
# `make demo`: a local AutoGLMDeployment end to end, on this machine, no Docker.
#  1. starts the local control plane (real apiserver/controller-manager/scheduler, kwok fake nodes)
#  2. installs the CRD, runs the operator locally, applies examples/tiny-cpu.yaml
#  3. starts the runtime locally on the embedded `tiny` model and asks it one chat question
# Pods in the cluster are simulated by kwok (no kubelet, no containers), so the answer comes from
# the runtime process started here, the same server every pod would run.
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
  python3 -m tests.cluster down --dir "$state/cluster" >/dev/null || true
  echo "Stopped."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting the local control plane"
up=$(python3 -m tests.cluster up --dir "$state/cluster")
echo "$up"
export KUBECONFIG="$state/cluster/kubeconfig"
bin=$(bash tests/cluster/gobuild/build.sh)
export PATH="$bin:$PATH"

step "Installing the CRD"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established crd/autoglmdeployments.autoglm.io --timeout=60s

step "Making the embedded tiny model"
model="$state/models/tiny"
[[ -f $model/config.json ]] || autoglm-runtime make-model --size tiny --out "$model"

step "Starting the operator (logs: $state/operator.log)"
autoglm-operator >"$state/operator.log" 2>&1 &
pids+=($!)

step "Applying examples/tiny-cpu.yaml"
kubectl apply -f examples/tiny-cpu.yaml
for _ in $(seq 1 120); do
  phase=$(kubectl get agd tiny -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [[ $phase == Healthy ]] && break
  sleep 0.5
done
kubectl get agd
echo
kubectl describe agd tiny
echo
kubectl get deploy,svc,pods -l app.kubernetes.io/instance=tiny

step "Starting the runtime locally on the tiny model (logs: $state/runtime.log)"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
autoglm-runtime serve --model "$model" --port "$port" --served-model-name tiny >"$state/runtime.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 240); do
  curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
  sleep 0.25
done
echo "POST /v1/chat/completions {\"messages\":[{\"role\":\"user\",\"content\":\"Hello, who are you?\"}]}"
curl -fsS "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"tiny","messages":[{"role":"user","content":"Hello, who are you?"}],"max_tokens":24,"temperature":0}' |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", repr(r["choices"][0]["message"]["content"])); print("usage:", r["usage"])'
echo "(the tiny model has random weights: the answer is gibberish, but every token went through the real server)"

step "The demo is running"
cat <<MSG
  export KUBECONFIG=$KUBECONFIG        # then: kubectl get agd; kubectl describe agd tiny
  export PATH=$bin:\$PATH               # kubectl and helm built for this cluster
  runtime: http://127.0.0.1:$port/v1  (OpenAI-compatible; metrics at /metrics)
  Pods in the cluster are simulated by kwok: they turn Ready, but no container runs.
MSG
if [[ ${AUTOGLM_DEMO_ONESHOT:-0} == 1 ]]; then exit 0; fi
echo "Press Ctrl-C to stop everything."
while true; do sleep 3600; done
