#!/usr/bin/env bash
# Set up everything store-edge needs on a fresh Debian 12 / Raspberry Pi OS bookworm machine:
# Debian packages (when missing), a virtualenv in .venv and the project installed into it.
# Usage: scripts/bootstrap.sh [runtime|cloud|test]   (idempotent; fast when already done)
# runtime: the edge; cloud: also edge-cloud's extra and PostgreSQL (the fleet demo); test: everything
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-runtime}"

apt_pkgs=(python3 python3-venv python3-dev gcc)
if [ "$mode" = test ]; then
  # a real Mosquitto broker (plain + TLS) for the uplink tests; dbus for the mocked BlueZ;
  # iproute2/util-linux for network namespaces that cut the uplink
  apt_pkgs+=(mosquitto dbus iproute2 util-linux openssl)
  apt_pkgs+=(systemd)  # systemd-analyze verify/security and systemd-sysusers for the unit checks
  apt_pkgs+=(chromium)  # the store page is tested in Debian's headless Chromium (Playwright never downloads one)
  apt_pkgs+=(postgresql)  # a real PostgreSQL for the cloud tests (they run their own cluster, not the service)
elif [ "$mode" = cloud ]; then
  apt_pkgs+=(postgresql)  # edge-cloud up runs its own cluster with Debian's binaries, not the service
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# the distribution's mosquitto service is not wanted: tests start their own brokers
if [ "$mode" = test ] && command -v systemctl >/dev/null && systemctl is-active -q mosquitto 2>/dev/null; then
  true  # leave a running system broker alone; tests use free ports
fi

py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.store-edge-$mode"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$mode" = test ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
  elif [ "$mode" = cloud ]; then
    .venv/bin/python -m pip install -q -e '.[cloud]'
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi
