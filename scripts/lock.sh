#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (exact versions with hashes). The full set is resolved
# first; the two smaller files are resolved under it, so a package has the same version in all three.
#   requirements-dev.txt      runtime + dev node + tests   (make test, CI)
#   requirements-devnode.txt  runtime + dev node           (make run, the Docker image)
#   requirements.txt          runtime: API and worker      (Docker image with WITH_DEVNODE=0)
#   requirements-gradio5.txt  gradio 5 alone, as on the nodes (.venv-gradio5, for tests/test_gradio5_client.py)
# Usage: scripts/lock.sh [--upgrade | --upgrade-package NAME ...]   (uv is installed into .venv if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${VENV:-.venv}/bin/python"
[ -x "$VENV_PY" ] || { echo "no project venv yet: run 'make venv' first" >&2; exit 1; }
"$VENV_PY" -m uv --version >/dev/null 2>&1 || "$VENV_PY" -m pip install -q uv
uv=("$VENV_PY" -m uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -q
    --custom-compile-command "make lock")
"${uv[@]}" "$@" --extra devnode --extra test -o requirements-dev.txt
"${uv[@]}" --extra devnode -c requirements-dev.txt -o requirements-devnode.txt
"${uv[@]}" -c requirements-dev.txt -o requirements.txt
# gradio 5, what the node apps run, for tests/test_gradio5_client.py (a separate environment: .venv-gradio5)
printf 'gradio>=5.20,<6\ngradio_client>=1.8,<2\n' > var-gradio5.in
"${uv[@]/pyproject.toml/var-gradio5.in}" -o requirements-gradio5.txt
rm -f var-gradio5.in
echo "lock files written: requirements.txt requirements-devnode.txt requirements-dev.txt requirements-gradio5.txt"
