#!/usr/bin/env bash
# Set up what c3-render needs on a Debian machine, idempotently:
#   1. system packages, when missing: redis-server, ffmpeg, python3-venv (and chromium for the tests);
#   2. the project virtualenv (.venv, made from the machine's python3; nothing goes into the system Python);
#   3. the locked Python packages (requirements*.txt, exact versions with hashes) and the project itself.
# Usage: scripts/install-deps.sh run|dev     run: service + dev node;  dev: that plus the test tools.
# A stamp in the venv records what was installed; when the lock file has not changed, this takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_PYTHON="${SYSTEM_PYTHON:-python3}"
VENV="${VENV:-.venv}"
profile="${1:-run}"
case "$profile" in
  run) lock=requirements-devnode.txt ;;
  dev) lock=requirements-dev.txt ;;
  *) echo "usage: $0 run|dev" >&2; exit 2 ;;
esac
started=$(date +%s)
say() { printf '[setup %3ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
quiet_pip() {  # pip with its per-file noise left out; fails when pip fails
  set +o pipefail
  "$VENV/bin/python" -m pip "$@" --disable-pip-version-check 2>&1 \
    | grep --line-buffered -Ev "^(  |Requirement already satisfied|WARNING: Location|Looking in |Ignoring )" | sed 's/^/    /'
  local rc=${PIPESTATUS[0]}
  set -o pipefail
  return "$rc"
}

# --- 1. system packages ---------------------------------------------------------------------------
command -v "$SYSTEM_PYTHON" >/dev/null 2>&1 || { echo "no $SYSTEM_PYTHON on PATH: install Python 3.11+ first" >&2; exit 1; }
"$SYSTEM_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "$SYSTEM_PYTHON is $("$SYSTEM_PYTHON" -V 2>&1); c3-render needs Python 3.11 or newer" >&2; exit 1; }
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; } || missing+=(ffmpeg)
if [ ! -x "$VENV/bin/python" ] && ! "$SYSTEM_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of python3 (package python3-venv, or python3.X-venv)
  minor=$("$SYSTEM_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  missing+=("python${minor}-venv")
fi
if [ "$profile" = dev ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the dashboard's browser test drives it
  # compose v1, what `apt install docker-compose` gives: tests/test_docker.py resolves the compose file with it
  [ -x /usr/bin/docker-compose ] || missing+=(docker-compose)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)  # the HTTP load of bench/ (make bench)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "missing system packages: ${missing[*]}; install them as root" >&2; exit 1; }
    SUDO="sudo"
  fi
  say "installing system packages with apt-get: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    | grep -E '^(Setting up|Unpacking) ' | sed 's/^/    /' || true
fi

# --- 2. the project virtualenv --------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the project virtualenv $VENV from $(command -v "$SYSTEM_PYTHON") ($("$SYSTEM_PYTHON" -V 2>&1))"
  "$SYSTEM_PYTHON" -m venv "$VENV"
fi

# --- 3. locked packages and the project -----------------------------------------------------------
stamp="$VENV/.installed-$profile"
want="$(cat "$lock" pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # nothing changed since the last install
fi
say "installing the locked Python packages from $lock into $VENV (a few minutes the first time)"
quiet_pip install --require-hashes --no-deps -r "$lock"
"$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check; exit 1; }
say "installing c3-render itself into $VENV (editable: the console scripts c3-render-worker, c3-render-devnode)"
quiet_pip install -q --no-deps -e .
echo "$want" > "$stamp"
say "done: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l) packages in $VENV ($(du -sh "$VENV" | cut -f1))"
