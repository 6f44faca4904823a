#!/usr/bin/env bash
# Start c3-render locally with its embedded defaults: a local redis-server (data in var/redis),
# the dev node (a local Comput3 stand-in with CPU engines), the API and one worker, all on
# loopback and pointed at each other, results in local-files mode under var/output.
# Ctrl-C stops all of it; the dev node stops its nodes as it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || { echo "no $PYTHON: run 'make run' (it sets up .venv first)" >&2; exit 1; }
started="${C3_RUN_STARTED:-$(date +%s)}"  # make run sets it before the set-up

port_free() {  # port_free PORT: nothing listens on 127.0.0.1:PORT
  "$PYTHON" - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}
# choose_port VAR DEFAULT WHAT: an explicitly set port must be free; a default one that is taken is
# replaced by the next free port, said in one line.
choose_port() {
  local var=$1 default=$2 what=$3 port
  if [ -n "${!var:-}" ]; then
    port_free "${!var}" || { echo "port ${!var} ($var, $what) is in use by another program: free it or set $var to another port" >&2; exit 1; }
    return
  fi
  port=$default
  while ! port_free "$port"; do port=$((port + 1)); done
  [ "$port" = "$default" ] || echo "port $default ($what) is in use by another program; using $port instead (set $var to choose)"
  printf -v "$var" '%s' "$port"
}
# Only this script's own redis-server: Redis settings exported in the shell (Sentinels, which win over
# REDIS_URL, a password, replica acks, the older REDIS_HOST) would point the API and worker elsewhere.
unset REDIS_SENTINELS REDIS_SENTINEL_MASTER REDIS_SENTINEL_PASSWORD REDIS_PASSWORD REDIS_MIN_REPLICA_ACKS REDIS_HOST
choose_port REDIS_PORT 6379 "Redis"
choose_port API_PORT 8000 "the API"
choose_port DEVNODE_PORT 8700 "the dev node"
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
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

names=()
# check_alive: every part started so far still runs; otherwise say which stopped and show its log's end
check_alive() {
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "${names[$i]} stopped during start-up; the end of var/log/${names[$i]}.log:" >&2
      tail -n 15 "var/log/${names[$i]}.log" | sed 's/^/    /' >&2
      exit 1
    fi
  done
}
wait_http() {  # wait_http URL NAME
  for _ in $(seq 1 480); do
    check_alive
    if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "$2 did not answer at $1 within 4 minutes; see var/log/" >&2
  exit 1
}

# Each part runs in its own session (setsid), so Ctrl-C reaches only this script, which then stops
# the parts in order.
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$PWD/var/redis" \
  --appendonly yes --appendfsync everysec --save "" >var/log/redis.log 2>&1 &
pids+=($!); names+=(redis)
echo "starting Redis on port $REDIS_PORT, the dev node on $DEVNODE_PORT (loads its CPU engines), the API on $API_PORT and a worker..."
setsid "$PYTHON" -m devnode --host 127.0.0.1 --port "$DEVNODE_PORT" >var/log/devnode.log 2>&1 &
pids+=($!); names+=(devnode)
wait_http "http://127.0.0.1:${DEVNODE_PORT}/admin/faults" "the dev node"
setsid "$PYTHON" -m gunicorn --bind "127.0.0.1:${API_PORT}" --workers 2 --worker-class gthread --threads 64 --graceful-timeout 30 \
  --access-logfile - 'app:create_app()' >var/log/api.log 2>&1 &
pids+=($!); names+=(api)
setsid "$PYTHON" c3_render_worker.py >var/log/worker.log 2>&1 &
pids+=($!); names+=(worker)
wait_http "http://127.0.0.1:${API_PORT}/readyz" "the API"
# the worker is ready once its heartbeat is in Redis
worker_alive='import sys, config, redis
r = redis.Redis.from_url(sys.argv[1])
sys.exit(0 if any(r.scan_iter(match=config.HEARTBEAT_KEY.format(worker="*"))) else 1)'
for _ in $(seq 1 120); do
  check_alive
  "$PYTHON" -c "$worker_alive" "$REDIS_URL" 2>/dev/null && break
  sleep 0.5
done
check_alive

cat <<MSG

c3-render is running, ready $(( $(date +%s) - started )) s after start (logs in var/log/):
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
wait -n "${pids[@]}" || true
for i in "${!pids[@]}"; do
  kill -0 "${pids[$i]}" 2>/dev/null || echo "${names[$i]} exited; see var/log/${names[$i]}.log" >&2
done
exit 1
