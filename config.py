"""Configuration: every environment variable, its default, and the Redis key names.

This is the one place where c3-render's settings and key names are defined; the API, the worker,
the storage and webhook modules all read them from here. Settings are read from the environment
when `load()` is called, so tests and tools can change the environment and load again.

Each setting is one line of the `Settings` dataclass, `setting(default, "ENV_NAME", reader)`: its default,
its variable and how the text is read (the reader of the default's type unless one is named) live there
and nowhere else; `load()` walks the fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

VERSION = "0.2.0"  # the service's version, shown at / and in /openapi.json (pyproject.toml says the same)

# --- Redis key names (jobstore.py, nodestore.py, webhook_state.py; Lua gets them via redis_lua.NAMES) ---
QUEUE_KEY = "queue:jobs"  # the one job queue: LPUSH to submit, BLMOVE from the right to take
QUEUE_PUSHES_KEY = "queue:jobs:pushes"  # counter: LPUSHes ever made to the queue (places its left end)
QUEUE_REQUEUED_KEY = "queue:jobs:requeued"  # sorted set: job id -> queue slot it was RPUSHed to
QUEUE_CANCELLED_KEY = "queue:jobs:cancelled"  # sorted set: job id -> slot of a cancelled entry still queued
JOB_KEY = "job:{id}"  # hash: one record per job
PROCESSING_KEY = "processing:{worker}"  # list: entries a worker has taken and not acknowledged
HEARTBEAT_KEY = "worker:{worker}:alive"  # string with a TTL: the worker is alive while it exists
WORKERS_KEY = "workers"  # set: ids of workers that have announced themselves
NODE_KEY = "node:{worker}:{type}"  # hash: the GPU node of one workload type a worker holds (or launches)
NODE_SLOTS_KEY = "nodes:slots"  # set: "<worker>|<type>" members holding one of the MAX_NODES node slots
NODES_TO_STOP_KEY = "nodes:to_stop"  # hash: workload -> node whose stop call failed; the sweep retries
NODES_OWNED_KEY = "nodes:owned"  # hash: workload -> JSON {worker, type, node, launched_at}: nodes we launched
LAUNCH_INTENTS_KEY = "nodes:launching"  # hash: intent id -> JSON launch window (worker, type, before, times)
WEBHOOK_OUTBOX_KEY = "webhooks:outbox"  # list: webhook deliveries waiting for a sender
WEBHOOK_INFLIGHT_KEY = "webhooks:inflight:{worker}"  # list: deliveries a worker is sending
WEBHOOK_RETRY_KEY = "webhooks:retry"  # sorted set: deliveries waiting for their next attempt
WEBHOOK_SENDERS_KEY = "webhooks:senders"  # set: workers that may hold an in-flight list (the sweep checks)
WEBHOOK_HISTORY_MAX = 20  # events kept in a job's webhook_history field (JSON list, oldest dropped)
RATE_KEY = "rate:{client}:{window}"  # counter: requests of one client in one time window
IDEMPOTENCY_KEY = "idem:{client}:{key}"  # string: job id and body hash of an Idempotency-Key
NODE_SECONDS_KEY = "stats:node_seconds"  # float: node-seconds used by all workers (launch to stop)
NODE_LOG_KEY = "stats:nodes"  # list: one JSON line per node stop (workload, worker, seconds)
NODE_SECONDS_DAY_KEY = "stats:node_seconds:{day}"  # float: node-seconds of nodes stopped that UTC day
SWEEP_WORKER_KEY = "sweep:{worker}"  # string with a TTL: a sweeper's claim on a dead worker's nodes
SWEEP_WORKLOAD_KEY = "sweep:workload:{workload}"  # string with a TTL: a sweeper's claim on stopping a workload
FILE_URL_SECRET_KEY = "config:file_url_secret"  # noqa: S105 string: signs /files URLs if FILE_URL_SECRET is unset
# GET /jobs: time-ordered indexes (sorted sets of job ids scored by created_at), trimmed like the records
JOBS_INDEX_KEY = "jobs:index"  # every job
JOBS_BY_TYPE_KEY = "jobs:index:type:{type}"  # the jobs of one type
JOBS_BY_STATUS_KEY = "jobs:index:status:{status}"  # the jobs in one status (moved on every transition)
JOB_HISTORY_KEY = "job:{id}:history"  # list: JSON {"status", "at"} per status change, expires with the record
FINISHED_RECENT_KEY = "stats:finished_recent"  # sorted set: jobs finished in the last day, scored by finish time
# /metrics: counters kept in Redis so that every API process answers the same numbers
JOBS_TOTAL_KEY = "stats:jobs_total"  # hash: "<type>|<status>" -> jobs submitted ("queued") or finished so
JOB_DURATION_KEY = "stats:job_duration:{type}"  # hash: bucket bound ("+Inf") -> count, and "sum", "count"
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)  # JOB_DURATION_KEY's bounds (s)
WEBHOOK_OUTCOMES_KEY = "stats:webhook_deliveries"  # hash: outcome (delivered, retrying, failed) -> count
# GET /events: Redis pub/sub channels (messages are only wake-ups; listeners read the record)
JOB_EVENTS_CHANNEL = "events:job:{id}"  # a job's record changed; the message is its change number
QUEUE_EVENTS_CHANNEL = "events:queue"  # a job left or re-entered the queue: queue positions moved
# Replication (redis_conn.py)
REPLICATION_PROBE_KEY = "replication:probe"  # string: written just before each WAIT, so WAIT covers all before it
PRIMARY_SINCE_KEY = "replication:primary_since:{replid}"  # string: when a promoted primary was first seen


def node_url_problem(name: str, template: str) -> str | None:
    """Why a node URL template (e.g. `https://ui-{node}`) is unusable, or None when it is fine."""
    try:
        url = template.format(node="node-1234.example")
    except (KeyError, IndexError, ValueError):
        return (f"{name}={template!r} is not a URL template with one {{node}} field "
                "(a docker compose default such as ${VAR:-http://{node}} ends at the first '}')")
    if template.count("{node}") != 1:
        return f"{name}={template!r} must contain {{node}} exactly once"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or "{" in url or "}" in url:
        return f"{name}={template!r} does not give an http(s) URL with a host (got {url!r})"
    return None


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"configuration error: {name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"configuration error: {name} must be a number, got {raw!r}") from None


def _bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").lower() in ("1", "true", "yes", "on")


def _url(name: str, default: str) -> str:
    return _env(name, default).rstrip("/")


def _at_least_one(name: str, default: int) -> int:
    return max(1, _int(name, default))


def _log_level(name: str, default: str) -> str:
    raw = _env(name, default).upper()
    if raw not in LOG_LEVELS:
        raise SystemExit(f"configuration error: {name} must be one of {', '.join(LOG_LEVELS)}, got {raw.lower()!r}")
    return raw


def _names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list; set but empty means none, unset means the default."""
    if name not in os.environ:
        return default
    return tuple(item.strip() for item in os.environ[name].split(",") if item.strip())


def _schedule(name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """"5,30,120": seconds to wait before each retry (so 4 attempts); unset or empty = the default."""
    raw = _env(name, "")
    if not raw:
        return default
    try:
        delays = tuple(float(item) for item in raw.split(","))
    except ValueError:
        delays = (-1.0,)
    if any(not 0 <= d <= 7 * 24 * 3600 for d in delays):
        raise SystemExit(f"configuration error: {name} must be comma-separated seconds between webhook "
                         f"attempts, each 0 to 604800, e.g. 5,30,120,600,3600; got {raw!r}")
    return delays


def _redis_url(name: str, default: str) -> str:
    """REDIS_URL, or the older REDIS_HOST / REDIS_PORT pair, or the default."""
    if os.environ.get(name, "").strip():
        return os.environ[name].strip()
    if os.environ.get("REDIS_HOST", "").strip():
        return f"redis://{os.environ['REDIS_HOST'].strip()}:{_env('REDIS_PORT', '6379')}/0"
    return default


SENTINEL_DEFAULT_PORT = 26379


def sentinel_address(entry: str) -> tuple[str, int] | None:
    """A REDIS_SENTINELS entry (host, host:port or [IPv6]:port; port 26379 when left out) as (host,
    port), or None when it is not one."""
    host, port = entry, str(SENTINEL_DEFAULT_PORT)
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if rest else port)
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _sentinels(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    entries = _names(name, default)
    for entry in entries:
        if sentinel_address(entry) is None:
            raise SystemExit(f"configuration error: {name} must be comma-separated host:port Sentinel addresses "
                             f"(e.g. sentinel-1:26379,sentinel-2:26379), got {entry!r}")
    return entries


_READERS = {str: _env, int: _int, float: _float, bool: _bool}  # a setting's reader when none is given


def setting(default: Any, env: str, read: Callable[[str, Any], Any] | None = None, *, secret: bool = False) -> Any:
    """A Settings field read from the environment variable `env`: `read(env, default)` gives its value
    (by default the reader of the default's type); a secret is kept out of repr()."""
    reader = read or _READERS[type(default)]
    return field(default=default, repr=not secret, metadata={"env": env, "read": reader})


@dataclass(frozen=True)
class Settings:
    # Redis and job records
    redis_url: str = setting("redis://localhost:6379/0", "REDIS_URL", _redis_url)
    redis_password: str = setting("", "REDIS_PASSWORD", secret=True)  # for the primary and replicas
    # set: the primary is the one these Sentinels name REDIS_SENTINEL_MASTER (REDIS_URL is not used)
    redis_sentinels: tuple[str, ...] = setting((), "REDIS_SENTINELS", _sentinels)
    redis_sentinel_master: str = setting("mymaster", "REDIS_SENTINEL_MASTER")
    redis_sentinel_password: str = setting("", "REDIS_SENTINEL_PASSWORD", secret=True)
    # replicas that must have a settling step (submit, claim, finish, requeue, webhook) before it counts
    redis_min_replica_acks: int = setting(0, "REDIS_MIN_REPLICA_ACKS")
    redis_replica_ack_timeout_s: float = setting(0.5, "REDIS_REPLICA_ACK_TIMEOUT_S")
    # a submit retries this long, then 503; an /events stream reads again this long, then ends
    redis_failover_wait_s: float = setting(10.0, "REDIS_FAILOVER_WAIT_S")
    result_ttl_s: int = setting(7 * 24 * 3600, "RESULT_TTL")
    max_attempts: int = setting(3, "MAX_ATTEMPTS")
    heartbeat_ttl_s: int = setting(30, "HEARTBEAT_TTL")
    sweep_interval_s: float = setting(15.0, "SWEEP_INTERVAL_S")
    # API
    api_keys: tuple[str, ...] = setting((), "C3_RENDER_API_KEYS", _names, secret=True)
    max_content_length: int = setting(1024 * 1024, "MAX_CONTENT_LENGTH")
    public_base_url: str = setting("http://127.0.0.1:8000", "PUBLIC_BASE_URL", _url)
    rate_limit_per_minute: int = setting(0, "RATE_LIMIT_PER_MINUTE")  # 0 = off
    public_routes: tuple[str, ...] = setting(("/docs", "/metrics"), "PUBLIC_ROUTES", _names)  # open without a key
    metrics_token: str = setting("", "METRICS_TOKEN", secret=True)
    sse_keepalive_s: float = setting(15.0, "SSE_KEEPALIVE_S")
    sse_max_streams: int = setting(48, "SSE_MAX_STREAMS")  # per API process; each stream holds a gunicorn thread
    # Result storage
    output_dir: str = setting("var/output", "OUTPUT_DIR")
    file_url_secret: str = setting("", "FILE_URL_SECRET", secret=True)
    minio_endpoint: str = setting("", "MINIO_ENDPOINT")
    minio_access_key: str = setting("", "MINIO_ACCESS_KEY", secret=True)
    minio_secret_key: str = setting("", "MINIO_SECRET_KEY", secret=True)
    minio_bucket: str = setting("c3-render-output", "MINIO_BUCKET")
    minio_secure: bool = setting(False, "MINIO_SECURE")
    minio_public_url: str = setting("", "MINIO_PUBLIC_URL", _url)
    minio_region: str = setting("us-east-1", "MINIO_REGION")
    # Webhooks
    webhook_secret: str = setting("", "WEBHOOK_SECRET", secret=True)
    webhook_attempts: int = setting(5, "WEBHOOK_ATTEMPTS")
    webhook_interval_s: float = setting(5.0, "WEBHOOK_INTERVAL_S")
    webhook_timeout_s: float = setting(10.0, "WEBHOOK_TIMEOUT_S")
    # () = WEBHOOK_ATTEMPTS attempts WEBHOOK_INTERVAL_S apart
    webhook_schedule: tuple[float, ...] = setting((), "WEBHOOK_SCHEDULE", _schedule)
    webhook_concurrency: int = setting(128, "WEBHOOK_CONCURRENCY", _at_least_one)
    webhook_per_host: int = setting(4, "WEBHOOK_PER_HOST", _at_least_one)
    # Comput3 and its nodes
    c3_api_key: str = setting("", "C3_API_KEY", secret=True)
    c3_api_url: str = setting("https://api.comput3.ai/api/v0", "C3_API_URL", _url)
    c3_node_url: str = setting("https://{node}", "C3_NODE_URL", _url)
    c3_comfyui_url: str = setting("https://ui-{node}", "C3_COMFYUI_URL", _url)
    # Ollama answers at the root of an ollama_webui node (docs/node-protocols.md, Node URLs and Ollama)
    c3_ollama_url: str = setting("https://{node}", "C3_OLLAMA_URL", _url)
    c3_origin: str = setting("https://launch.comput3.ai", "C3_ORIGIN")
    workload_type: str = setting("media:fast", "C3_WORKLOAD_TYPE")  # CSM, WhisperX, ComfyUI
    # Ollama with llama3.2-vision:11b
    analyze_workload_type: str = setting("ollama_webui:fast", "C3_ANALYZE_WORKLOAD_TYPE")
    # ComfyUI answers 404/502 for minutes after a fresh node's root is up; public clients wait up to 7 min.
    service_ready_timeout_s: float = setting(480.0, "SERVICE_READY_TIMEOUT")
    c3_read_timeout_s: float = setting(60.0, "C3_READ_TIMEOUT")
    launch_window_slack_s: float = setting(10.0, "LAUNCH_WINDOW_SLACK_S")
    node_check_ttl_s: float = setting(30.0, "NODE_CHECK_TTL")
    ollama_model: str = setting("llama3.2-vision:11b", "OLLAMA_MODEL")
    max_nodes: int = setting(4, "MAX_NODES")
    node_boot_timeout_s: float = setting(600.0, "NODE_BOOT_TIMEOUT")
    node_max_age_s: float = setting(3600.0, "NODE_MAX_AGE")
    node_expires_margin_s: float = setting(900.0, "NODE_EXPIRES_MARGIN")
    gpu_idle_timeout_s: float = setting(300.0, "GPU_IDLE_TIMEOUT")
    launch_attempts: int = setting(5, "LAUNCH_ATTEMPTS")
    launch_backoff_s: float = setting(2.0, "LAUNCH_BACKOFF_S")
    # Worker
    work_dir: str = setting("var/work", "WORK_DIR")
    worker_grace_s: float = setting(30.0, "WORKER_GRACE_S")
    max_input_bytes: int = setting(200 * 1024 * 1024, "MAX_INPUT_BYTES")
    max_audio_seconds: float = setting(600.0, "MAX_AUDIO_SECONDS")
    max_image_pixels: int = setting(40_000_000, "MAX_IMAGE_PIXELS")
    download_timeout_s: float = setting(120.0, "DOWNLOAD_TIMEOUT_S")
    node_failure_retries: int = setting(1, "NODE_FAILURE_RETRIES")
    # ComfyUI's --max-upload-size: larger audio is compressed first
    comfyui_max_upload_mb: float = setting(100.0, "COMFYUI_MAX_UPLOAD_MB")
    # wait this long for a node still busy with a stopped job
    node_drain_timeout_s: float = setting(600.0, "NODE_DRAIN_TIMEOUT")
    url_allowlist: tuple[str, ...] = setting((), "URL_ALLOWLIST", _names)
    storage_retry_s: float = setting(60.0, "STORAGE_RETRY_S")
    min_free_disk_mb: int = setting(512, "MIN_FREE_DISK_MB")
    worker_id: str = setting("", "WORKER_ID")  # "" = <host>-<pid>-<random>, made at worker start
    log_level: str = setting("INFO", "LOG_LEVEL", _log_level)  # the worker's
    # Engines: the WhisperX app's audio input (unverified; some deployments used input_file)
    whisper_audio_input_name: str = setting("audio_file", "WHISPER_AUDIO_INPUT_NAME")


def load() -> Settings:
    """Read every setting from the environment (see .env.example for the documented list)."""
    return Settings(**{f.name: f.metadata["read"](f.metadata["env"], f.default) for f in fields(Settings)})


# Variables earlier versions read, and what replaces each: set, they are named at the worker's start.
RETIRED_VARIABLES = {"COMFYUI_READY_TIMEOUT": "SERVICE_READY_TIMEOUT"}


def retired_variables_set() -> list[str]:
    """One line per retired variable that is still set, saying what to set instead."""
    return [f"{old} is no longer read (since 0.2.0); set {new} instead (now {os.environ.get(new, 'unset')})"
            for old, new in RETIRED_VARIABLES.items() if old in os.environ]


def node_url_problems(settings: Settings) -> list[str]:
    """Why each unusable node URL template of settings is unusable (empty when all are fine)."""
    templates = {"C3_NODE_URL": settings.c3_node_url, "C3_COMFYUI_URL": settings.c3_comfyui_url,
                 "C3_OLLAMA_URL": settings.c3_ollama_url}
    return [problem for name, template in templates.items() if (problem := node_url_problem(name, template))]
