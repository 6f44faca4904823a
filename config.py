"""Configuration: every environment variable, its default, and the Redis key names.

This is the one place where c3-render's settings and key names are defined; the API, the worker,
the storage and webhook modules all read them from here. Settings are read from the environment
when `load()` is called, so tests and tools can change the environment and load again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

VERSION = "0.2.0"  # the service's version, shown at / and in /openapi.json (pyproject.toml says the same)

# --- Redis key names (the queue protocol; see jobstore.py) ---------------------------------
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
# GET /jobs: time-ordered indexes (sorted sets of job ids scored by created_at), trimmed like the records
JOBS_INDEX_KEY = "jobs:index"  # every job
JOBS_BY_TYPE_KEY = "jobs:index:type:{type}"  # the jobs of one type
JOBS_BY_STATUS_KEY = "jobs:index:status:{status}"  # the jobs in one status (moved on every transition)
JOB_HISTORY_KEY = "job:{id}:history"  # list: JSON {"status", "at"} per status change, expires with the record
FINISHED_RECENT_KEY = "stats:finished_recent"  # sorted set: jobs finished in the last day, scored by finish time
# /metrics: counters kept in Redis so that every API process answers the same numbers
JOBS_TOTAL_KEY = "stats:jobs_total"  # hash: "<type>|<status>" -> jobs submitted ("queued") or finished so
JOB_DURATION_KEY = "stats:job_duration:{type}"  # hash: bucket bound ("+Inf") -> count, and "sum", "count"
WEBHOOK_OUTCOMES_KEY = "stats:webhook_deliveries"  # hash: outcome (delivered, retrying, failed) -> count
# GET /events: Redis pub/sub channels (messages are only wake-ups; listeners read the record)
JOB_EVENTS_CHANNEL = "events:job:{id}"  # a job's record changed; the message is its change number
QUEUE_EVENTS_CHANNEL = "events:queue"  # a job left or re-entered the queue: queue positions moved

DEFAULT_C3_API_URL = "https://api.comput3.ai/api/v0"
DEFAULT_C3_NODE_URL = "https://{node}"
DEFAULT_C3_COMFYUI_URL = "https://ui-{node}"
# Ollama answers at the root of an ollama_webui node (PROTOCOLS.md 2 and 6).
DEFAULT_C3_OLLAMA_URL = "https://{node}"
DEFAULT_WORKLOAD_TYPE = "media:fast"  # CSM, WhisperX, ComfyUI
DEFAULT_ANALYZE_WORKLOAD_TYPE = "ollama_webui:fast"  # Ollama with llama3.2-vision:11b
# ComfyUI answers 404/502 for minutes after a fresh node's root is up; public clients wait up to 7 min.
DEFAULT_SERVICE_READY_TIMEOUT_S = 480.0


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


def _list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _schedule(name: str) -> tuple[float, ...]:
    """"5,30,120": seconds to wait before each retry (so 4 attempts); unset or empty = ()."""
    raw = _env(name, "")
    if not raw:
        return ()
    try:
        delays = tuple(float(item) for item in raw.split(","))
    except ValueError:
        delays = (-1.0,)
    if any(not 0 <= d <= 7 * 24 * 3600 for d in delays):
        raise SystemExit(f"configuration error: {name} must be comma-separated seconds between webhook "
                         f"attempts, each 0 to 604800, e.g. 5,30,120,600,3600; got {raw!r}")
    return delays


def redis_url_from_env() -> str:
    """REDIS_URL, or the older REDIS_HOST / REDIS_PORT pair, or the local default."""
    if os.environ.get("REDIS_URL", "").strip():
        return os.environ["REDIS_URL"].strip()
    if os.environ.get("REDIS_HOST", "").strip():
        host = os.environ["REDIS_HOST"].strip()
        port = _env("REDIS_PORT", "6379")
        return f"redis://{host}:{port}/0"
    return "redis://localhost:6379/0"


@dataclass(frozen=True)
class Settings:
    # Redis and job records
    redis_url: str = "redis://localhost:6379/0"
    result_ttl_s: int = 7 * 24 * 3600
    max_attempts: int = 3
    heartbeat_ttl_s: int = 30
    sweep_interval_s: float = 15.0
    # API
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_content_length: int = 1024 * 1024
    public_base_url: str = "http://127.0.0.1:8000"
    rate_limit_per_minute: int = 0  # 0 = off
    public_routes: tuple[str, ...] = ("/docs", "/metrics")  # open without an API key
    metrics_token: str = field(default="", repr=False)
    sse_keepalive_s: float = 15.0
    sse_max_streams: int = 48  # per API process; each open stream holds one gunicorn thread
    # Result storage
    output_dir: str = "var/output"
    file_url_secret: str = field(default="", repr=False)
    minio_endpoint: str = ""
    minio_access_key: str = field(default="", repr=False)
    minio_secret_key: str = field(default="", repr=False)
    minio_bucket: str = "c3-render-output"
    minio_secure: bool = False
    minio_public_url: str = ""
    minio_region: str = "us-east-1"
    # Webhooks
    webhook_secret: str = field(default="", repr=False)
    webhook_attempts: int = 5
    webhook_interval_s: float = 5.0
    webhook_timeout_s: float = 10.0
    webhook_schedule: tuple[float, ...] = ()  # () = WEBHOOK_ATTEMPTS attempts WEBHOOK_INTERVAL_S apart
    webhook_concurrency: int = 128
    webhook_per_host: int = 4
    # Comput3 and its nodes
    c3_api_key: str = field(default="", repr=False)
    c3_api_url: str = DEFAULT_C3_API_URL
    c3_node_url: str = DEFAULT_C3_NODE_URL
    c3_comfyui_url: str = DEFAULT_C3_COMFYUI_URL
    c3_ollama_url: str = DEFAULT_C3_OLLAMA_URL
    c3_origin: str = "https://launch.comput3.ai"
    workload_type: str = DEFAULT_WORKLOAD_TYPE
    analyze_workload_type: str = DEFAULT_ANALYZE_WORKLOAD_TYPE
    service_ready_timeout_s: float = DEFAULT_SERVICE_READY_TIMEOUT_S
    c3_read_timeout_s: float = 60.0
    launch_window_slack_s: float = 10.0
    node_check_ttl_s: float = 30.0
    ollama_model: str = "llama3.2-vision:11b"
    max_nodes: int = 4
    node_boot_timeout_s: float = 600.0
    node_max_age_s: float = 3600.0
    node_expires_margin_s: float = 900.0
    gpu_idle_timeout_s: float = 300.0
    launch_attempts: int = 5
    launch_backoff_s: float = 2.0
    # Worker
    work_dir: str = "var/work"
    worker_grace_s: float = 30.0
    max_input_bytes: int = 200 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_image_pixels: int = 40_000_000
    download_timeout_s: float = 120.0
    node_failure_retries: int = 1
    comfyui_max_upload_mb: float = 100.0  # ComfyUI's --max-upload-size: larger audio is compressed first
    node_drain_timeout_s: float = 600.0  # wait this long for a node still busy with a stopped job
    url_allowlist: tuple[str, ...] = field(default_factory=tuple)
    storage_retry_s: float = 60.0
    min_free_disk_mb: int = 512


def load() -> Settings:
    """Read every setting from the environment (see .env.example for the documented list)."""
    return Settings(
        redis_url=redis_url_from_env(),
        result_ttl_s=_int("RESULT_TTL", 7 * 24 * 3600),
        max_attempts=_int("MAX_ATTEMPTS", 3),
        heartbeat_ttl_s=_int("HEARTBEAT_TTL", 30),
        sweep_interval_s=_float("SWEEP_INTERVAL_S", 15.0),
        api_keys=tuple(_list("C3_RENDER_API_KEYS")),
        max_content_length=_int("MAX_CONTENT_LENGTH", 1024 * 1024),
        public_base_url=_env("PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
        rate_limit_per_minute=_int("RATE_LIMIT_PER_MINUTE", 0),
        public_routes=tuple(_list("PUBLIC_ROUTES")) if "PUBLIC_ROUTES" in os.environ else ("/docs", "/metrics"),
        metrics_token=_env("METRICS_TOKEN", ""),
        sse_keepalive_s=_float("SSE_KEEPALIVE_S", 15.0),
        sse_max_streams=_int("SSE_MAX_STREAMS", 48),
        output_dir=_env("OUTPUT_DIR", "var/output"),
        file_url_secret=_env("FILE_URL_SECRET", ""),
        minio_endpoint=_env("MINIO_ENDPOINT", ""),
        minio_access_key=_env("MINIO_ACCESS_KEY", ""),
        minio_secret_key=_env("MINIO_SECRET_KEY", ""),
        minio_bucket=_env("MINIO_BUCKET", "c3-render-output"),
        minio_secure=_bool("MINIO_SECURE", False),
        minio_public_url=_env("MINIO_PUBLIC_URL", "").rstrip("/"),
        minio_region=_env("MINIO_REGION", "us-east-1"),
        webhook_secret=_env("WEBHOOK_SECRET", ""),
        webhook_attempts=_int("WEBHOOK_ATTEMPTS", 5),
        webhook_interval_s=_float("WEBHOOK_INTERVAL_S", 5.0),
        webhook_timeout_s=_float("WEBHOOK_TIMEOUT_S", 10.0),
        webhook_schedule=_schedule("WEBHOOK_SCHEDULE"),
        webhook_concurrency=max(1, _int("WEBHOOK_CONCURRENCY", 128)),
        webhook_per_host=max(1, _int("WEBHOOK_PER_HOST", 4)),
        c3_api_key=_env("C3_API_KEY", ""),
        c3_api_url=_env("C3_API_URL", DEFAULT_C3_API_URL).rstrip("/"),
        c3_node_url=_env("C3_NODE_URL", DEFAULT_C3_NODE_URL).rstrip("/"),
        c3_comfyui_url=_env("C3_COMFYUI_URL", DEFAULT_C3_COMFYUI_URL).rstrip("/"),
        c3_ollama_url=_env("C3_OLLAMA_URL", DEFAULT_C3_OLLAMA_URL).rstrip("/"),
        c3_origin=_env("C3_ORIGIN", "https://launch.comput3.ai"),
        workload_type=_env("C3_WORKLOAD_TYPE", DEFAULT_WORKLOAD_TYPE),
        analyze_workload_type=_env("C3_ANALYZE_WORKLOAD_TYPE", DEFAULT_ANALYZE_WORKLOAD_TYPE),
        service_ready_timeout_s=_float("SERVICE_READY_TIMEOUT", DEFAULT_SERVICE_READY_TIMEOUT_S),
        c3_read_timeout_s=_float("C3_READ_TIMEOUT", 60.0),
        launch_window_slack_s=_float("LAUNCH_WINDOW_SLACK_S", 10.0),
        node_check_ttl_s=_float("NODE_CHECK_TTL", 30.0),
        ollama_model=_env("OLLAMA_MODEL", "llama3.2-vision:11b"),
        max_nodes=_int("MAX_NODES", 4),
        node_boot_timeout_s=_float("NODE_BOOT_TIMEOUT", 600.0),
        node_max_age_s=_float("NODE_MAX_AGE", 3600.0),
        node_expires_margin_s=_float("NODE_EXPIRES_MARGIN", 900.0),
        gpu_idle_timeout_s=_float("GPU_IDLE_TIMEOUT", 300.0),
        launch_attempts=_int("LAUNCH_ATTEMPTS", 5),
        launch_backoff_s=_float("LAUNCH_BACKOFF_S", 2.0),
        work_dir=_env("WORK_DIR", "var/work"),
        worker_grace_s=_float("WORKER_GRACE_S", 30.0),
        max_input_bytes=_int("MAX_INPUT_BYTES", 200 * 1024 * 1024),
        max_audio_seconds=_float("MAX_AUDIO_SECONDS", 600.0),
        max_image_pixels=_int("MAX_IMAGE_PIXELS", 40_000_000),
        download_timeout_s=_float("DOWNLOAD_TIMEOUT_S", 120.0),
        node_failure_retries=_int("NODE_FAILURE_RETRIES", 1),
        comfyui_max_upload_mb=_float("COMFYUI_MAX_UPLOAD_MB", 100.0),
        node_drain_timeout_s=_float("NODE_DRAIN_TIMEOUT", 600.0),
        url_allowlist=tuple(_list("URL_ALLOWLIST")),
        storage_retry_s=_float("STORAGE_RETRY_S", 60.0),
        min_free_disk_mb=_int("MIN_FREE_DISK_MB", 512),
    )


def node_url_problems(settings: Settings) -> list[str]:
    """Why each unusable node URL template of settings is unusable (empty when all are fine)."""
    templates = {"C3_NODE_URL": settings.c3_node_url, "C3_COMFYUI_URL": settings.c3_comfyui_url,
                 "C3_OLLAMA_URL": settings.c3_ollama_url}
    return [problem for name, template in templates.items() if (problem := node_url_problem(name, template))]
