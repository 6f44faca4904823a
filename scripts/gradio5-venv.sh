#!/usr/bin/env bash
# A second Python environment, .venv-gradio5, with gradio 5 (what the media:fast node apps run) from its
# lock file, for tests/test_gradio5_client.py: the worker's gradio_client against a real gradio-5 server.
# `make test` runs this; the test is skipped, saying so, while the environment is missing. About 500 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_PYTHON="${SYSTEM_PYTHON:-python3}"
VENV5=.venv-gradio5
want="$(sha256sum requirements-gradio5.txt | cut -c1-16)"
if [ -f "$VENV5/.installed" ] && [ "$(cat "$VENV5/.installed")" = "$want" ]; then
  exit 0
fi
echo "[setup] making $VENV5 (gradio 5, as on the nodes, for tests/test_gradio5_client.py)"
[ -x "$VENV5/bin/python" ] || "$SYSTEM_PYTHON" -m venv "$VENV5"
# (pipefail: a failed pip fails this script; the filter itself may find nothing to print)
"$VENV5/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps \
  -r requirements-gradio5.txt 2>&1 | { grep -v "WARNING: Location" || true; }
"$VENV5/bin/python" -c "import gradio; print('    gradio', gradio.__version__, 'in $VENV5')"
echo "$want" > "$VENV5/.installed"
