#!/usr/bin/env bash
# Start c3-render locally with its embedded defaults: a local redis-server (data in var/redis),
# the dev node (a local Comput3 stand-in with CPU engines), the API and one worker, all on
# loopback and pointed at each other, results in local-files mode under var/output.
# Ctrl-C stops all of it; the dev node stops its nodes as it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

API_PORT="${API_PORT:-8000}"
DEVNODE_PORT="${DEVNODE_PORT:-8700}"
REDIS_PORT="${REDIS_PORT:-6379}"
mkdir -p var/redis var/output var/work var/log

export REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
export C3_API_KEY="${C3_API_KEY:-dev-node-key}"
export C3_API_URL="http://127.0.0.1:${DEVNODE_PORT}/api/v0"
export C3_NODE_URL="http://{node}"
export C3_COMFYUI_URL="http://{node}/comfyui"
export C3_OLLAMA_URL="http://{node}"  # Ollama at the root of the dev node's ollama_webui nodes
export PUBLIC_BASE_URL="${PUBLIC_BASE_URL:-http://127.0.0.1:${API_PORT}}"
# The worker may fetch inputs from this machine (the API's own /files links, a local file server).
export URL_ALLOWLIST="${URL_ALLOWLIST:-127.0.0.0/8,::1/128,localhost}"
export OUTPUT_DIR="${OUTPUT_DIR:-var/output}"
export WORK_DIR="${WORK_DIR:-var/work}"
export GPU_IDLE_TIMEOUT="${GPU_IDLE_TIMEOUT:-300}"
export NODE_BOOT_TIMEOUT="${NODE_BOOT_TIMEOUT:-120}"
export DEVNODE_CACHE_DIR="${DEVNODE_CACHE_DIR:-var/devnode-cache}"
export DEVNODE_DATA_DIR="${DEVNODE_DATA_DIR:-var/devnode-data}"
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping c3-render (worker, API, dev node, Redis)..."
  # newest first: the worker stops its node and leaves Redis tidy before Redis goes
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  echo "stopped."
}
trap cleanup INT TERM EXIT

wait_http() {  # wait_http URL NAME
  for _ in $(seq 1 240); do
    if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "$2 did not start; see var/log/" >&2
  exit 1
}

# Each part runs in its own session (setsid), so Ctrl-C reaches only this script, which then stops
# the parts in order.
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$PWD/var/redis" \
  --appendonly yes --appendfsync everysec --save "" >var/log/redis.log 2>&1 &
pids+=($!)
setsid "$PYTHON" -m devnode --host 127.0.0.1 --port "$DEVNODE_PORT" >var/log/devnode.log 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:${DEVNODE_PORT}/admin/faults" "the dev node"
setsid "$PYTHON" -m gunicorn --bind "127.0.0.1:${API_PORT}" --workers 2 --threads 4 --graceful-timeout 30 \
  --access-logfile - 'app:create_app()' >var/log/api.log 2>&1 &
pids+=($!)
setsid "$PYTHON" c3_render_worker.py >var/log/worker.log 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:${API_PORT}/readyz" "the API"

cat <<MSG

c3-render is running (logs in var/log/):
  API       http://127.0.0.1:${API_PORT}    (OpenAPI document at /openapi.json)
  dev node  http://127.0.0.1:${DEVNODE_PORT}   (local Comput3 stand-in, CPU engines)

Try it:
  curl -s -X POST http://127.0.0.1:${API_PORT}/csm -H 'Content-Type: application/json' \\
       -d '{"text": "Hello from c3-render. This runs on your own machine."}'
  curl -s http://127.0.0.1:${API_PORT}/status/<id>
  curl -s http://127.0.0.1:${API_PORT}/result/<id>

Press Ctrl-C to stop everything.
MSG

# Stop everything if any part dies; otherwise wait for Ctrl-C.
wait -n "${pids[@]}"
echo "a component exited; see var/log/" >&2
exit 1
