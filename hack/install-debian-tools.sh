#!/usr/bin/env bash
# Install Debian's prometheus, prometheus-node-exporter (telemetry tests, demo) and shellcheck (lint of
# the kind scripts) binaries without starting any service.
#
# The packages are fetched with apt-get download and unpacked with dpkg -x into
# ${DUALPATH_CACHE:-~/.cache/dualpath}/debian/<package>/<version>/ (no maintainer scripts, no systemd
# units, nothing listening). If the binaries are already on PATH (e.g. apt-get install was run), those
# are used. Prints the directory holding usr/bin of each package.
set -euo pipefail
CACHE=${DUALPATH_CACHE:-$HOME/.cache/dualpath}
log() { printf '[install-debian-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

install_pkg() {
  local pkg=$1 bin=$2 ver dir
  ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
  if [[ -z $ver || $ver == "(none)" ]]; then
    log "$pkg: apt knows no candidate; running apt-get update once"
    apt-get update -qq >&2 || true
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
  fi
  [[ -n $ver && $ver != "(none)" ]] || { log "$pkg: no version available from apt"; exit 1; }
  dir=$CACHE/debian/$pkg/${ver//[:+~]/_}
  if [[ -x $dir/usr/bin/$bin ]]; then log "$pkg $ver: cache hit"; echo "$dir/usr/bin"; return; fi
  log "$pkg $ver: downloading and unpacking"
  local tmp; tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && apt-get download "$pkg=$ver" >&2 2>/dev/null || apt-get download "$pkg=$ver" >&2)
  rm -rf "$dir.partial"; mkdir -p "$dir.partial"
  dpkg -x "$tmp"/*.deb "$dir.partial"
  rm -rf "$tmp" "$dir"; mv "$dir.partial" "$dir"
  echo "$dir/usr/bin"
}

install_pkg prometheus prometheus
install_pkg prometheus-node-exporter prometheus-node-exporter
install_pkg shellcheck shellcheck
