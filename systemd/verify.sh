#!/usr/bin/env bash
# Check the shipped units: `systemd-analyze verify` must print nothing at all (it exits 0 on
# most mistakes, so any stderr output fails), and `systemd-analyze security --offline=true`
# must rate the service "OK" (overall exposure <= 2.5). Prints the exposure figure.
# ExecStart points at /opt/store-edge/venv (the installed layout), which does not exist on a
# build machine: the unit is checked as a copy whose ExecStart is this checkout's `edge`.
# Usage: systemd/verify.sh [EDGE_BINARY [UNIT_FILE]]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
edge_bin="${1:-$here/../.venv/bin/edge}"
unit="${2:-$here/edge.service}"
edge_bin="$(cd "$(dirname "$edge_bin")" && pwd)/$(basename "$edge_bin")"
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd/verify.sh: systemd-analyze not found (apt-get install systemd)" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed "s#^ExecStart=/opt/store-edge/venv/bin/edge #ExecStart=$edge_bin #" "$unit" > "$work/edge.service"
grep -q "^ExecStart=$edge_bin " "$work/edge.service" || { echo "verify.sh: ExecStart not found in edge.service" >&2; exit 1; }

out="$(systemd-analyze verify --man=no "$work/edge.service" 2>&1)" || { echo "$out" >&2; echo "systemd-analyze verify failed" >&2; exit 1; }
if [ -n "$out" ]; then
  echo "$out" >&2
  echo "systemd-analyze verify printed the above: fix the unit" >&2
  exit 1
fi
report="$(systemd-analyze security --offline=true --no-pager "$work/edge.service" 2>&1)" || true
line="$(printf '%s\n' "$report" | grep 'Overall exposure level' || true)"
if [ -z "$line" ]; then
  echo "$report" >&2
  echo "systemd-analyze security gave no exposure level" >&2
  exit 1
fi
echo "edge.service: verify clean; ${line#→ }"
systemd-analyze security --offline=true --threshold=25 --no-pager "$work/edge.service" >/dev/null 2>&1 \
  || { echo "exposure above 2.5 (target: OK)" >&2; exit 1; }
