#!/usr/bin/env bash
# Link the cached tool binaries into .dev/bin (git-ignored) so every script and test finds them in one place.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(dirname "$HERE")
# shellcheck source=versions.env
eval "$(sed -n 's/^\([A-Z0-9_]*\)=\(.*\)$/\1=${\1:-\2}/p' "$HERE/versions.env")"
CACHE=${DUALPATH_CACHE:-$HOME/.cache/dualpath}
BIN=$ROOT/.dev/bin; mkdir -p "$BIN"
link() { [[ -x $1 ]] || { echo "missing $1: run make setup" >&2; exit 1; }; ln -sfn "$1" "$BIN/$2"; }
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do link "$CACHE/k8s/$K8S_VERSION/$b" "$b"; done
link "$CACHE/etcd/$ETCD_VERSION/etcd" etcd
link "$CACHE/kwok/$KWOK_VERSION/kwok" kwok
ln -sfn "$CACHE/kwok/$KWOK_VERSION/stages.yaml" "$BIN/kwok-stages.yaml"
link "$CACHE/helm/$HELM_VERSION/helm" helm
while read -r dir; do
  for b in "$dir"/*; do ln -sfn "$b" "$BIN/$(basename "$b")"; done
done < <("$HERE/install-debian-tools.sh")
echo "tools linked into $BIN:" >&2; ls "$BIN" >&2
