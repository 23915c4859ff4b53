#!/usr/bin/env bash
# Check every shipped unit (systemd/*.service): `systemd-analyze verify` must print nothing at
# all (it exits 0 on most mistakes, so any output fails), and `systemd-analyze security
# --offline=true` must rate each service "OK" (overall exposure <= 2.5) without a word on
# stderr. Prints one exposure figure per unit.
# ExecStart points at /opt/store-edge/venv/bin (the installed layout), which does not exist on a
# build machine: each unit is checked as a copy whose ExecStart is this checkout's binary.
# Usage: systemd/verify.sh [BIN_DIR_OR_EDGE_BINARY [UNIT_FILE]]   (no UNIT_FILE: every unit)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../.venv/bin/edge}"
[ -d "$bin" ] || bin="$(dirname "$bin")"
bin="$(cd "$bin" && pwd)"
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd/verify.sh: systemd-analyze not found (apt-get install systemd)" >&2
  exit 1
fi
if [ -n "${2:-}" ]; then units=("$2"); else units=("$here"/*.service); fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for unit in "${units[@]}"; do
  name="$(basename "$unit")"
  copy="$work/$name"
  sed "s#^ExecStart=/opt/store-edge/venv/bin/#ExecStart=$bin/#" "$unit" > "$copy"
  grep -q "^ExecStart=$bin/" "$copy" || { echo "verify.sh: no ExecStart=/opt/store-edge/venv/bin/... in $name" >&2; exit 1; }

  out="$(systemd-analyze verify --man=no "$copy" 2>&1)" || { echo "$out" >&2; echo "systemd-analyze verify failed for $name" >&2; exit 1; }
  if [ -n "$out" ]; then
    echo "$out" >&2
    echo "systemd-analyze verify printed the above for $name: fix the unit" >&2
    exit 1
  fi
  report="$(systemd-analyze security --offline=true --no-pager "$copy" 2>"$work/stderr")" || true
  if [ -s "$work/stderr" ]; then
    cat "$work/stderr" >&2
    echo "systemd-analyze security printed the above on stderr for $name: fix the unit" >&2
    exit 1
  fi
  line="$(printf '%s\n' "$report" | grep 'Overall exposure level' || true)"
  if [ -z "$line" ]; then
    echo "$report" >&2
    echo "systemd-analyze security gave no exposure level for $name" >&2
    exit 1
  fi
  echo "$name: verify clean; ${line#→ }"
  systemd-analyze security --offline=true --threshold=25 --no-pager "$copy" >/dev/null 2>&1 \
    || { echo "$name: exposure above 2.5 (target: OK)" >&2; exit 1; }
done
