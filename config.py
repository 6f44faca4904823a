"""Configuration: every environment variable, its default, and the Redis key names.

This is the one place where c3-render's settings and key names are defined; the API, the worker,
the storage and webhook modules all read them from here. Settings are read from the environment
when `load()` is called, so tests and tools can change the environment and load again.

Each setting is one line of the `Settings` dataclass, `setting(default, "ENV_NAME", reader)`: its default,
its variable and how the text is read (the reader of the default's type unless one is named) live there
and nowhere else; `load()` walks the fields.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from jobspec import JOB_TYPES

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
# The node pool (nodestore.py): nodes belong to the service; a job leases a slot of one
POOL_NODES_KEY = "pool:nodes"  # set: ids of the pool's nodes (launching, booting, ready, stopping): MAX_NODES caps it
POOL_NODE_KEY = "pool:node:{id}"  # hash: one pool node (type, state, workload, node, times, its time accounts)
POOL_LEASES_KEY = "pool:leases:{id}"  # hash: job id -> JSON {worker, service, since, share}: the jobs on a node
POOL_STATS_KEY = "pool:stats"  # hash: boot:<type>, service:<service> estimates; idle_since:<type>
POOL_GAPS_KEY = "pool:gaps:{type}"  # list: recent idle gaps of a node type (seconds), newest last
POOL_MAINTAINER_KEY = "pool:maintainer"  # string with a TTL: the worker that looks after idle nodes now
NODE_TIME_KEY = "stats:node_time"  # hash: booting | busy | idle -> node-seconds, for /metrics
NODES_TO_STOP_KEY = "nodes:to_stop"  # hash: workload -> node whose stop call failed; the sweep retries
NODES_OWNED_KEY = "nodes:owned"  # hash: workload -> JSON {id, worker, type, node, launched_at}: nodes we launched
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
SWEEP_WORKLOAD_KEY = "sweep:workload:{workload}"  # string with a TTL: a sweeper's claim on stopping a workload
FILE_URL_SECRET_KEY = "config:file_url_secret"  # noqa: S105 string: signs /files URLs if FILE_URL_SECRET is unset
# GET /jobs: time-ordered indexes (sorted sets of job ids scored by created_at), trimmed like the records
JOBS_INDEX_KEY = "jobs:index"  # every job
JOBS_BY_TYPE_KEY = "jobs:index:type:{type}"  # the jobs of one type
JOBS_BY_STATUS_KEY = "jobs:index:status:{status}"  # the jobs in one status (moved on every transition)
JOBS_BY_OWNER_KEY = "jobs:index:owner:{owner}"  # the jobs one API key submitted (owner: the key's id)
JOB_HISTORY_KEY = "job:{id}:history"  # list: JSON {"status", "at"} per status change, expires with the record
# Pipelines (pipelines.py): jobs whose inputs are earlier jobs' outputs; records expire with their jobs
PIPELINE_KEY = "pipeline:{id}"  # hash: one pipeline (status, its steps' job ids and graph, owner, webhook)
PIPELINES_INDEX_KEY = "pipelines:index"  # sorted set: every pipeline id, scored by created_at
PIPELINES_BY_OWNER_KEY = "pipelines:index:owner:{owner}"  # sorted set: the pipelines one API key submitted
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
PIPELINE_EVENTS_CHANNEL = "events:pipeline:{id}"  # a pipeline or one of its steps changed (its change number)


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


NODE_POLICIES = ("adaptive", "fixed")
SERVICES = JOB_TYPES  # a node runs each job type as a service of its own (NODE_SLOTS counts per service)


def _node_policy(name: str, default: str) -> str:
    raw = _env(name, default).lower()
    if raw not in NODE_POLICIES:
        raise SystemExit(f"configuration error: {name} must be one of {', '.join(NODE_POLICIES)}, got {raw!r}")
    return raw


def _node_slots(name: str, default: str) -> str:
    """NODE_SLOTS: "csm:1,whisper:1,portrait:1,analyze:1" (jobs of each service a node runs at once), and
    optionally a bare number, the most jobs a node runs at once in all ("1" alone: one job per node)."""
    raw = _env(name, default).replace(" ", "")
    try:
        parse_node_slots(raw)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {name}: {exc}; e.g. csm:1,whisper:1,portrait:1,analyze:1 "
                         f"or 1 (one job per node), got {raw!r}") from None
    return raw


def parse_node_slots(text: str) -> tuple[dict[str, int], int]:
    """(slots per service, most jobs at once) of a NODE_SLOTS value; a service not named gets 1 slot."""
    slots = dict.fromkeys(SERVICES, 1)
    total = 0
    for item in filter(None, text.split(",")):
        service, sep, count = item.partition(":")
        if not sep:
            service, count = "", service
        if service and service not in SERVICES:
            raise ValueError(f"unknown service {service!r} (one of {', '.join(SERVICES)})")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{item!r} is not a whole number of slots, 1 or more")
        if service:
            slots[service] = int(count)
        else:
            total = int(count)
    return slots, total or sum(slots.values())


def _prices(name: str, default: str) -> str:
    """C3_PRICE_PER_HOUR: one price per node-hour for every type ("1.10") or per type
    ("media:fast=1.10,ollama_webui:fast=0.80"); empty = unknown (no cost is shown)."""
    raw = _env(name, default).replace(" ", "")
    try:
        parse_prices(raw)
    except ValueError:
        raise SystemExit(f"configuration error: {name} must be a price per node-hour (e.g. 1.10) or "
                         f"<type>=<price> pairs (e.g. media:fast=1.10,ollama_webui:fast=0.80), got {raw!r}") from None
    return raw


def parse_prices(text: str) -> dict[str, float]:
    """{node type: price per hour} of a C3_PRICE_PER_HOUR value; "*" is the price of every other type."""
    prices: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        node_type, sep, price = item.rpartition("=")
        value = float(price)
        if value < 0 or value != value:
            raise ValueError(item)
        prices[node_type if sep else "*"] = value
    return prices


_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # the standard alphabet (RFC 4648 section 4), padding optional


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret, as the Standard Webhooks libraries read it: "whsec_<base64>" is the
    decoded bytes (standard alphabet; the padding may be left out, as the Python library allows), any other
    text its UTF-8 bytes. ValueError (naming no part of the secret) for a whsec_ secret they would not read
    alike: URL-safe or other characters (Python's decoder drops them, JavaScript's refuses), or empty."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    body = secret[len("whsec_"):]
    if not _BASE64_RE.fullmatch(body):
        raise ValueError("starts with whsec_ but what follows is not standard base64 (A-Z a-z 0-9 + / and "
                         "'=' padding; URL-safe '-' and '_' are not read alike by Standard Webhooks verifiers)")
    unpadded = body.rstrip("=")
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("starts with whsec_ but what follows is not whole base64 (its length is wrong)") from None
    if not key:
        raise ValueError("starts with whsec_ but holds no key bytes")
    return key


def _webhook_secret(name: str, default: str) -> str:
    secret = _env(name, default)
    try:
        webhook_secret_key(secret)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {name} {exc}; without the whsec_ prefix the text itself "
                         "is the key") from None
    return secret


def split_s3_url(value: str, default_secure: bool) -> tuple[str, bool]:
    """'host:port' or 'http(s)://host:port[/]' -> ('host:port', secure); ValueError for anything else. No
    path: an S3 signature (SigV4) covers the path the S3 server receives, and buckets live at its root."""
    value = value.strip()
    if "://" not in value:
        value = ("https://" if default_secure else "http://") + value
    url = urlsplit(value)
    if url.username or url.password:  # the value is not repeated: it may hold a password
        raise ValueError("has user info; only http(s)://host:port is allowed (the S3 keys are settings)")
    try:
        url.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{value!r} is not host:port or http(s)://host:port")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(
            f"{value!r} has a path, query or fragment; only http(s)://host:port is allowed: buckets are at the "
            "S3 server's root and a result link's signature (SigV4) covers the path the server receives, so a "
            "prefix (a CDN or proxy serving the bucket under /something) would break every link; give the S3 "
            "server, or a proxy that passes the Host header and the path on unchanged, its own host name")
    return url.netloc, url.scheme == "https"


def _s3_address(name: str, default: str) -> str:
    """MINIO_ENDPOINT / MINIO_PUBLIC_URL: checked at load, so the API and the worker refuse to start
    instead of failing when a finished job's result is stored or presigned."""
    url = _url(name, default)
    if not url:
        return url
    try:
        split_s3_url(url, False)
    except ValueError as exc:
        raise SystemExit(f"configuration error: {name} {exc}") from None
    return url


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
    # keys that also see every job, /overview and the dashboard's numbers (accepted without being in api_keys)
    admin_keys: tuple[str, ...] = setting((), "C3_RENDER_ADMIN_KEYS", _names, secret=True)
    # on: the API and the worker refuse to start without C3_RENDER_API_KEYS (compose's worker-comput3 sets it)
    require_api_keys: bool = setting(False, "REQUIRE_API_KEYS")
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
    minio_endpoint: str = setting("", "MINIO_ENDPOINT", _s3_address)
    minio_access_key: str = setting("", "MINIO_ACCESS_KEY", secret=True)
    minio_secret_key: str = setting("", "MINIO_SECRET_KEY", secret=True)
    minio_bucket: str = setting("c3-render-output", "MINIO_BUCKET")
    minio_secure: bool = setting(False, "MINIO_SECURE")
    minio_public_url: str = setting("", "MINIO_PUBLIC_URL", _s3_address)
    minio_region: str = setting("us-east-1", "MINIO_REGION")
    # Webhooks
    webhook_secret: str = setting("", "WEBHOOK_SECRET", _webhook_secret, secret=True)
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
    # The node pool: what a node runs at once, how idle nodes are kept, what a node-hour costs
    node_policy: str = setting("adaptive", "NODE_POLICY", _node_policy)
    node_slots: str = setting("csm:1,whisper:1,portrait:1,analyze:1", "NODE_SLOTS", _node_slots)
    min_warm_nodes: int = setting(0, "MIN_WARM_NODES")
    node_boot_estimate_s: float = setting(120.0, "NODE_BOOT_ESTIMATE_S")  # until boots are measured
    job_time_estimate_s: float = setting(60.0, "JOB_TIME_ESTIMATE_S")  # until jobs are measured
    price_per_hour: str = setting("", "C3_PRICE_PER_HOUR", _prices)
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

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        """Every key the API accepts (C3_RENDER_API_KEYS and C3_RENDER_ADMIN_KEYS); empty: keys are off."""
        return self.api_keys + self.admin_keys


def load() -> Settings:
    """Read every setting from the environment (see .env.example for the documented list); a value that
    cannot work ends the process with one "configuration error: NAME ..." line (SystemExit)."""
    settings = Settings(**{f.name: f.metadata["read"](f.metadata["env"], f.default) for f in fields(Settings)})
    if settings.require_api_keys and not settings.all_api_keys:
        raise SystemExit("configuration error: C3_RENDER_API_KEYS is empty and REQUIRE_API_KEYS is on (docker "
                         "compose's worker-comput3 sets it: it launches paid GPU nodes for whoever reaches the "
                         "API); set C3_RENDER_API_KEYS to one or more comma-separated keys for the API and workers")
    return settings


def keyless_exposure_warning(settings: Settings, addresses: Iterable[str]) -> str | None:
    """The API's start-up warning when it asks for no key (C3_RENDER_API_KEYS empty) and listens beyond
    loopback; `addresses` ("host", "host:port", "[v6]:port") are where it listens. None when keys are on or
    every address is loopback."""
    if settings.all_api_keys:
        return None
    beyond = [address for address in addresses if not _is_loopback(address)]
    if not beyond:
        return None
    return (f"API keys are off (C3_RENDER_API_KEYS is empty) and the API listens on {', '.join(beyond)}, beyond "
            "loopback: whoever reaches it can submit jobs, which launch GPU nodes, and read every job; set "
            "C3_RENDER_API_KEYS, or bind to 127.0.0.1")


def _is_loopback(address: str) -> bool:
    bare_ipv6 = address.count(":") > 1 and not address.startswith("[")
    host = address if bare_ipv6 else urlsplit(f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve beyond loopback
        return False


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
