#!/usr/bin/env bash
# Install what c3-render needs on a Debian machine: system packages (redis-server, ffmpeg) when
# missing, then the Python packages. Usage: scripts/install-deps.sh [run|dev]
#   run: the service and the local dev node;  dev: that plus the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
profile="${1:-run}"

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

case "$profile" in
  run) req=requirements-devnode.txt ;;
  dev) req=requirements-dev.txt ;;
  *) echo "usage: $0 [run|dev]" >&2; exit 2 ;;
esac
# Quiet when everything is there already; pip only reaches the package registry for what is missing.
"$PYTHON" -m pip install -q --disable-pip-version-check -r "$req"
