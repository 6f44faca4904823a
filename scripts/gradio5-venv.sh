#!/bin/sh
# A throwaway Python environment with gradio 5 (what the media:fast node apps run), for
# tests/test_gradio5_client.py, which checks the worker's gradio_client against a gradio-5 server.
# The test is skipped while var/gradio5-venv is missing. About 500 MB; delete var/gradio5-venv to remove.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv var/gradio5-venv
var/gradio5-venv/bin/python -m pip install --quiet "gradio>=5.20,<6" "gradio_client>=1.8,<2"
var/gradio5-venv/bin/python -c "import gradio; print('gradio', gradio.__version__, 'in var/gradio5-venv')"
