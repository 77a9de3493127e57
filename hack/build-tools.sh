#!/usr/bin/env bash
# Build the real Kubernetes control plane and its helpers from the Go module proxy.
#
#   hack/build-tools.sh [component ...]      components: k8s etcd kwok helm (default: all)
#
# Each component lands in ${DUALPATH_CACHE:-~/.cache/dualpath}/<component>/<version>/ and is published
# whole or not at all (built into <dir>.partial, then renamed). A cache hit rebuilds nothing.
# Versions are pinned in hack/versions.env; override with the environment variables of the same name.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
eval "$(sed -n 's/^\([A-Z0-9_]*\)=\(.*\)$/\1=${\1:-\2}/p' "$HERE/versions.env")"
CACHE=${DUALPATH_CACHE:-$HOME/.cache/dualpath}

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { printf '[build-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Print a line every 30 s while a long step runs, so a cold build never looks hung.
with_progress() {
  local what=$1; shift
  local start=$SECONDS
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (( (SECONDS - start) % 30 < 5 )) && kill -0 "$pid" 2>/dev/null; then
      log "$what: still running ($((SECONDS - start)) s)"
    fi
  done
  wait "$pid"
  log "$what: done in $((SECONDS - start)) s"
}

build_k8s() {
  local ver=$K8S_VERSION out=$CACHE/k8s/$K8S_VERSION
  if [[ -x $out/kube-apiserver && -x $out/kubectl ]]; then log "k8s $ver: cache hit ($out)"; return; fi
  log "k8s $ver: cold build (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl); 10-30 min on 2 cores"
  local staging="v0.${ver#v1.}" minor
  minor=$(echo "$ver" | cut -d. -f2)
  local work; work=$(mktemp -d)
  (
    cd "$work"
    go mod init dualpath.invalid/k8sbin >/dev/null 2>&1
    local upstream
    upstream=$(go mod download -json "k8s.io/kubernetes@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    # Every requirement at v0.0.0 is a staging module: require + replace it at v0.X.Y.
    for m in $(go mod edit -json "$upstream" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Require") or []:
    if r["Version"] == "v0.0.0":
        print(r["Path"])'); do
      go mod edit -require="$m@$staging" -replace="$m=$m@$staging"
    done
    # GODEBUG defaults come from the main module: copy upstream's.
    for kv in $(go mod edit -json "$upstream" | python3 -c '
import json, sys
print(" ".join(g["Key"] + "=" + g["Value"] for g in json.load(sys.stdin).get("Godebug") or []))'); do
      go mod edit -godebug="$kv"
    done
    go mod edit -require="k8s.io/kubernetes@$ver"
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    with_progress "k8s $ver: go mod tidy" go mod tidy
    local ld="-s -w" now
    now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $p.gitVersion=$ver -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$now"
    done
    rm -rf "$out.partial"; mkdir -p "$out.partial"
    with_progress "k8s $ver: go build" go build -trimpath -ldflags "$ld" -o "$out.partial/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
    go version > "$out.partial/BUILT_WITH"
  )
  rm -rf "$work"
  rm -rf "$out"; mv "$out.partial" "$out"
  "$out/kube-apiserver" --version >&2
}

build_etcd() {
  local ver=$ETCD_VERSION out=$CACHE/etcd/$ETCD_VERSION
  if [[ -x $out/etcd ]]; then log "etcd $ver: cache hit ($out)"; return; fi
  log "etcd $ver: cold build"
  local work; work=$(mktemp -d)
  (
    cd "$work"
    go mod init dualpath.invalid/etcdbin >/dev/null 2>&1
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    with_progress "etcd $ver: go get" go get "go.etcd.io/etcd/server/v3@$ver"
    go mod tidy
    rm -rf "$out.partial"; mkdir -p "$out.partial"
    with_progress "etcd $ver: go build" go build -trimpath -ldflags "-s -w" -o "$out.partial/etcd" go.etcd.io/etcd/server/v3
  )
  rm -rf "$work"
  rm -rf "$out"; mv "$out.partial" "$out"
  "$out/etcd" --version >&2
}

build_kwok() {
  local ver=$KWOK_VERSION out=$CACHE/kwok/$KWOK_VERSION
  if [[ -x $out/kwok && -s $out/stages.yaml ]]; then log "kwok $ver: cache hit ($out)"; return; fi
  log "kwok $ver: cold build"
  rm -rf "$out.partial"; mkdir -p "$out.partial"
  with_progress "kwok $ver: go install" env GOBIN="$out.partial" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$ver"
  # kwok run outside kwokctl has no built-in stages: ship the upstream "fast" set (node initialize,
  # lease heartbeat, pod ready/complete/delete) from the module source, as kwokctl does.
  local src
  src=$(go mod download -json "sigs.k8s.io/kwok@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ $first == 1 ]] || echo "---" >> "$out.partial/stages.yaml"
    first=0
    cat "$src/kustomize/stage/$f" >> "$out.partial/stages.yaml"
  done
  rm -rf "$out"; mv "$out.partial" "$out"
  "$out/kwok" --version >&2 || true
}

build_helm() {
  local ver=$HELM_VERSION out=$CACHE/helm/$HELM_VERSION minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  if [[ -x $out/helm ]]; then log "helm $ver: cache hit ($out)"; return; fi
  log "helm $ver: cold build"
  rm -rf "$out.partial"; mkdir -p "$out.partial"
  # Helm compiles in Kubernetes 1.20 as its default capability unless told otherwise.
  with_progress "helm $ver: go install" env GOBIN="$out.partial" go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$ver -X helm.sh/helm/v3/internal/version.metadata= \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    "helm.sh/helm/v3/cmd/helm@$ver"
  rm -rf "$out"; mv "$out.partial" "$out"
  "$out/helm" version --short >&2
}

components=("$@")
[[ ${#components[@]} -eq 0 ]] && components=(etcd kwok helm k8s)
for c in "${components[@]}"; do
  case $c in
    k8s) build_k8s ;;
    etcd) build_etcd ;;
    kwok) build_kwok ;;
    helm) build_helm ;;
    *) echo "unknown component: $c (expected k8s, etcd, kwok, helm)" >&2; exit 2 ;;
  esac
done
