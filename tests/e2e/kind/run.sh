#!/usr/bin/env bash
# Run the dualpath e2e suite (pytest -m e2e tests/e2e) on a kind cluster. Needs Docker, kind (>= 0.24),
# kubectl, helm, curl and the project's .venv (make setup). Docs: docs/kind.md.
#
#   tests/e2e/kind/run.sh [--name NAME] [--gpus N] [--keep] [--skip-build] [--no-tests] [-- PYTEST_ARGS...]
#
# Steps: create the cluster (tests/e2e/kind/cluster.yaml, one shared KV storage directory mounted on every
# worker); make each worker a fake GPU/RDMA node (nvidia.com/gpu, nvidia.com/sriov_rdma and
# rdma/hca_shared_devices_a capacity by JSON patches on the node's /status through `kubectl proxy`, GPU
# feature-discovery labels); build the engine image in CPU mode and the operator image and `kind load`
# them; install charts/dualpath-operator; deploy the emulated NIC telemetry DaemonSet
# (tests/e2e/kind/nic-telemetry.yaml); run the e2e suite with KUBECONFIG pointing at the cluster. The
# cluster is deleted at the end unless --keep. The user's ~/.kube/config is never touched.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
HERE="$ROOT/tests/e2e/kind"
NAME=${KIND_CLUSTER_NAME:-dualpath}
GPUS=8
KEEP=0
BUILD=1
TESTS=1
PYTEST_ARGS=()
ENGINE_IMAGE=${DUALPATH_ENGINE_IMAGE:-dualpath-engine:0.1.0}
OPERATOR_IMAGE=${DUALPATH_OPERATOR_IMAGE:-dualpath-operator:0.1.0}
RELEASE=dualpath-operator
RELEASE_NAMESPACE=dualpath-system
ENGINE_UID=10001
NODE_WAIT_S=${DUALPATH_KIND_NODE_WAIT_S:-60}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

log() { printf '[kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while (($#)); do
  case $1 in
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --gpus) GPUS=${2:?--gpus needs a value}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --skip-build) BUILD=0; shift ;;
    --no-tests) TESTS=0; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH (see docs/kind.md)"
done
[[ -x $PYTHON ]] || die "$PYTHON not found: run 'make setup' first"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dualpath-kind.XXXXXX")
export KUBECONFIG="$WORK/kubeconfig"
PROXY_PID=""

cleanup() {
  local rc=$?
  if [[ -n $PROXY_PID ]]; then kill "$PROXY_PID" 2>/dev/null || true; fi
  if ((KEEP)); then
    log "cluster '$NAME' kept; KUBECONFIG=$KUBECONFIG; delete with: kind delete cluster --name $NAME"
  else
    log "deleting cluster '$NAME'"
    kind delete cluster --name "$NAME" >&2 || true
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- 1. cluster ----------------------------------------------------------------------------------------
create_cluster() {
  mkdir -p "$WORK/shared/storage"
  # Engines run as UID 10001 on every node and share this directory (the KV store).
  chmod 0777 "$WORK/shared/storage"
  sed "s|@SHARED_DIR@|$WORK/shared|g" "$HERE/cluster.yaml" >"$WORK/cluster.yaml"
  log "creating kind cluster '$NAME' (1 control plane, $(grep -c 'role: worker' "$WORK/cluster.yaml") workers)"
  kind create cluster --name "$NAME" --config "$WORK/cluster.yaml" --kubeconfig "$KUBECONFIG" --wait 180s >&2
}

workers() {
  kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}'
}

# --- 2. fake GPU/RDMA nodes ----------------------------------------------------------------------------
start_proxy() {
  kubectl proxy --address=127.0.0.1 --port=0 >"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do
    PROXY_PORT=$(sed -n 's/^Starting to serve on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$WORK/proxy.log")
    [[ -n $PROXY_PORT ]] && return 0
    kill -0 "$PROXY_PID" 2>/dev/null || die "kubectl proxy exited: $(cat "$WORK/proxy.log")"
    sleep 0.1
  done
  die "kubectl proxy did not report its port within 10 s"
}

stop_proxy() {
  kill "$PROXY_PID" 2>/dev/null || true
  wait "$PROXY_PID" 2>/dev/null || true
  PROXY_PID=""
}

# JSON patch of the node's status (as kwok's docs do): `add` creates or replaces each extended resource.
# '/' in a resource name is '~1' in a JSON pointer.
patch_node_resources() {
  local node=$1 patch="[" sep="" section resource value
  for section in capacity allocatable; do
    for resource in "nvidia.com/gpu=$GPUS" "nvidia.com/sriov_rdma=$GPUS" "rdma/hca_shared_devices_a=1"; do
      value=${resource#*=}
      patch+="$sep{\"op\":\"add\",\"path\":\"/status/$section/${resource%=*}\",\"value\":\"$value\"}"
      sep=","
    done
  done
  patch=${patch//nvidia.com\/gpu/nvidia.com~1gpu}
  patch=${patch//nvidia.com\/sriov_rdma/nvidia.com~1sriov_rdma}
  patch=${patch//rdma\/hca_shared_devices_a/rdma~1hca_shared_devices_a}
  patch+="]"
  curl --silent --show-error --fail --max-time 30 -X PATCH \
    -H 'Content-Type: application/json-patch+json' --data "$patch" \
    "http://127.0.0.1:$PROXY_PORT/api/v1/nodes/$node/status" >/dev/null
}

label_node() {
  local node=$1 index=$2
  kubectl label node "$node" --overwrite \
    nvidia.com/gpu.present=true \
    nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 \
    nvidia.com/gpu.count="$GPUS" \
    nvidia.com/gpu.memory=81559 \
    nvidia.com/gpu.family=hopper \
    topology.kubernetes.io/zone=zone-a \
    dualpath.io/network-block="block-$((index / 2 + 1))" >&2
}

# Directories on the node that engine pods (UID 10001) write: the fake sysfs tree that node_exporter reads.
prepare_node_dirs() {
  local node=$1
  docker exec "$node" install -d -m 0755 -o "$ENGINE_UID" -g "$ENGINE_UID" /var/lib/dualpath/sys
}

fake_gpu_nodes() {
  local node index=0 gpus i
  start_proxy
  for node in $(workers); do
    log "node $node: $GPUS x nvidia.com/gpu, $GPUS x nvidia.com/sriov_rdma, 1 x rdma/hca_shared_devices_a"
    patch_node_resources "$node"
    label_node "$node" "$index"
    prepare_node_dirs "$node"
    index=$((index + 1))
  done
  stop_proxy
  for node in $(workers); do
    for ((i = 0; ; i++)); do
      gpus=$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')
      [[ $gpus == "$GPUS" ]] || ((i >= NODE_WAIT_S)) && break
      sleep 1
    done
    [[ $gpus == "$GPUS" ]] || die "node $node: allocatable nvidia.com/gpu is '$gpus', expected $GPUS"
  done
}

# --- 3. images -----------------------------------------------------------------------------------------
build_images() {
  # CPU mode: a Debian Python base instead of the CUDA one. The engines still need torch (the model
  # runner); it comes from requirements.lock and runs on CPU (the operator renders device: cpu).
  log "building $ENGINE_IMAGE (CPU mode; installs torch from requirements.lock, several GB)"
  docker build -f "$ROOT/engine_image/Dockerfile" \
    --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_EXTRA= \
    -t "$ENGINE_IMAGE" "$ROOT" >&2
  log "building $OPERATOR_IMAGE"
  docker build -f "$ROOT/operator/Dockerfile" -t "$OPERATOR_IMAGE" "$ROOT" >&2
}

load_images() {
  local image
  for image in "$ENGINE_IMAGE" "$OPERATOR_IMAGE"; do
    log "kind load $image"
    kind load docker-image --name "$NAME" "$image" >&2
  done
}

# --- 4. operator and telemetry -------------------------------------------------------------------------
install_operator() {
  log "installing charts/dualpath-operator as $RELEASE in $RELEASE_NAMESPACE"
  helm upgrade --install "$RELEASE" "$ROOT/charts/dualpath-operator" \
    --namespace "$RELEASE_NAMESPACE" --create-namespace \
    --set-string image.repository="${OPERATOR_IMAGE%:*}" \
    --set-string image.tag="${OPERATOR_IMAGE##*:}" \
    --set-string image.pullPolicy=IfNotPresent \
    --wait --timeout 5m >&2
}

install_telemetry() {
  log "deploying the emulated NIC telemetry DaemonSet"
  kubectl apply -f "$HERE/nic-telemetry.yaml" >&2
  kubectl -n dualpath-telemetry rollout status daemonset/nic-telemetry --timeout=180s >&2
}

# --- 5. e2e suite --------------------------------------------------------------------------------------
run_tests() {
  log "running the e2e suite against '$NAME'"
  (
    cd "$ROOT"
    DUALPATH_E2E_PLATFORM=kind DUALPATH_ENGINE_IMAGE="$ENGINE_IMAGE" \
      "$PYTHON" -m pytest -m e2e tests/e2e "${PYTEST_ARGS[@]}"
  )
}

create_cluster
fake_gpu_nodes
if ((BUILD)); then build_images; fi
load_images
install_operator
install_telemetry
if ((TESTS)); then run_tests; else log "cluster ready; --no-tests given"; fi
