"""The c3-render HTTP API: one Flask file.

Takes jobs (POST /csm, /portrait, /api/v1/jobs/whisper (alias /whisper), /analyze), validates them
against jobspec.py and queues them through jobstore.py; answers /status and /result, cancels, serves
local result files on signed URLs, and describes itself at /openapi.json (openapi.py). Routes are plain
module-level functions on one blueprint; `create_app()` only wires settings, Redis, error handlers and
the other blueprints (pipelines.py, events.py, metrics.py, dashboard.py). What the blueprints share (errors, the job
status object, the request's settings and Redis client) is in api_common.py.
Run it with `gunicorn 'app:create_app()'` in production or `flask --app app run` for development.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

import click
import redis
from flask import Blueprint, Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

import api_common
import config
import dashboard
import events
import jobspec
import jobstats
import jobstore
import localfiles
import metrics
import pipelines
import redis_conn
import storage
import webhook_state
from api_common import (
    ApiError,
    attach,
    cancel_answer,
    error_response,
    idempotency,
    iso,
    json_body,
    record_or_error,
    result_of,
    settings,
    status_answer,
    store,
    submit_answer,
)
from jobspec import IDEMPOTENCY_HEADER
from openapi import openapi_document

log = logging.getLogger("c3-render.api")

VERSION = config.VERSION
OPEN_ROUTES = ("/", "/healthz", "/readyz", "/openapi.json")

api = Blueprint("api", __name__)


def flask_run_host() -> str | None:
    """The address `flask run` binds (its --host) when it is what calls create_app, else None (gunicorn's
    addresses are checked by gunicorn.conf.py)."""
    context = click.get_current_context(silent=True)
    return context.params.get("host") if context is not None and context.info_name == "run" else None


def create_app(app_settings: config.Settings | None = None) -> Flask:
    app_settings = app_settings or config.load()
    if warning := config.keyless_exposure_warning(app_settings, [host for host in [flask_run_host()] if host]):
        log.warning(warning)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = app_settings.max_content_length
    app.json.sort_keys = False
    attach(app, app_settings, redis_conn.connect(app_settings, timeout_s=2.0))
    app.register_error_handler(ApiError, on_api_error)
    app.register_error_handler(redis.RedisError, on_redis_error)
    app.register_error_handler(redis_conn.NotReplicated, on_not_replicated)
    app.register_error_handler(HTTPException, on_http_error)
    app.register_error_handler(Exception, on_unexpected)
    app.before_request(check_api_key)
    app.register_blueprint(api)
    app.register_blueprint(events.events_routes)
    app.register_blueprint(metrics.metrics_routes)
    app.register_blueprint(dashboard.dashboard_routes)
    app.register_blueprint(pipelines.pipeline_routes)
    return app


# --- errors: always JSON, never a stack trace --------------------------------------------------

def on_api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.headers)


def on_redis_error(exc: redis.RedisError) -> Response:
    log.warning("Redis unavailable: %s", type(exc).__name__)
    return error_response(503, "service unavailable: the job store (Redis) cannot be reached; "
                               "retry shortly", {"Retry-After": "5"})


def on_not_replicated(exc: redis_conn.NotReplicated) -> Response:
    """A write the replicas did not confirm (REDIS_MIN_REPLICA_ACKS) may be lost in a failover: the
    client is told to send it again (a submit with its Idempotency-Key gets the same job, if it lived)."""
    log.warning("Redis replicas did not confirm a write: %s", exc)
    return error_response(503, "service unavailable: the job store could not confirm the change on its "
                               f"replicas ({exc.acked} of {exc.wanted} in time), so it may be lost in a "
                               "failover; send the request again (a request sent again with the same "
                               f"{IDEMPOTENCY_HEADER} is not queued twice)", {"Retry-After": "2"})


def on_http_error(exc: HTTPException) -> Response:
    messages = {
        404: "not found",
        405: f"method {request.method} not allowed on {request.path}",
        413: f"request body too large (limit {settings().max_content_length} bytes)",
    }
    message = messages.get(exc.code or 500, exc.description or exc.name)
    headers = {}
    if getattr(exc, "valid_methods", None):  # 405 keeps its Allow header (RFC 9110)
        headers["Allow"] = ", ".join(exc.valid_methods)
    return error_response(exc.code or 500, message, headers)


def on_unexpected(exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "internal error")


# --- API keys and rate limits ------------------------------------------------------------------

def is_open_route(path: str) -> bool:
    """Routes answered without an API key: the service routes, signed file links, the dashboard's page
    and scripts (they hold no data: the page asks for a key and sends it with every call), and the
    PUBLIC_ROUTES (default /docs and /metrics, each with what is under it)."""
    if path in OPEN_ROUTES or path.startswith("/files/") or path in dashboard.SHELL_ROUTES \
            or path.startswith(dashboard.ASSET_PREFIX):
        return True
    return any(path == route or path.startswith(route.rstrip("/") + "/") for route in settings().public_routes)


def key_id(key: str) -> str:
    """The id of an API key, as job records (owner), rate limits and idempotency keys know it: the first
    16 hex digits of its SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_api_key() -> None:
    """Refuse a request without a valid key (when keys are set) and record who asks: the key's id and
    whether it is an admin key (api_common.set_caller)."""
    if is_open_route(request.path):
        return
    api_settings = settings()
    if not api_settings.all_api_keys:
        return
    given = request.headers.get("X-C3-RENDER-KEY", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    matched = admin = False
    keys = [(key, False) for key in api_settings.api_keys] + [(key, True) for key in api_settings.admin_keys]
    for key, is_admin in keys:  # compare with every key, in constant time
        same = hmac.compare_digest(given.encode(), key.encode())
        matched |= same
        admin |= same & is_admin
    if not given or not matched:
        raise ApiError(401, "missing or invalid API key: send X-C3-RENDER-KEY or "
                            "Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
    g.client_id = "key:" + key_id(given)
    api_common.set_caller(key_id(given), admin)


def submit(job_type: str) -> Response:
    body = json_body()
    try:
        params = jobspec.validate(job_type, body)
    except jobspec.ValidationError as exc:
        raise ApiError(400, str(exc)) from None
    idem_key, params_hash = idempotency(job_type, params)
    r = store()

    def write(rate_key: str, limit: int) -> tuple[str, bool]:
        return jobstore.submit(r, job_type, params, idempotency_key=idem_key, request_hash=params_hash,
                               owner=api_common.caller_owner(), rate_key=rate_key, rate_limit=limit)

    def created(job_id: str) -> dict[str, Any]:
        log.info("job %s (%s) queued", job_id, job_type)
        return {"id": job_id, "status": "queued"}

    def replayed(job_id: str) -> dict[str, Any] | None:
        record = jobstore.get_job(r, job_id)
        return None if record is None else {"id": job_id, "status": record["status"]}

    return submit_answer(write, created, replayed, " (other job parameters)")


for _route, _job_type in jobspec.SUBMIT_ROUTES.items():
    api.add_url_rule(_route, f"submit_{_route}", lambda job_type=_job_type: submit(job_type), methods=["POST"])


# --- following jobs ----------------------------------------------------------------------------

@api.get("/jobs")
def list_jobs() -> Response:
    """The caller's jobs, newest first (an admin key, or no keys at all: every job)."""
    status_filter = request.args.get("status") or None
    type_filter = request.args.get("type") or None
    if status_filter is not None and status_filter not in jobspec.STATUSES:
        raise ApiError(400, f"status: one of {', '.join(jobspec.STATUSES)}")
    if type_filter is not None and type_filter not in jobspec.JOB_TYPES:
        raise ApiError(400, f"type: one of {', '.join(jobspec.JOB_TYPES)}")
    limit = api_common.page_limit(jobspec.JOBS_PAGE_DEFAULT, jobspec.JOBS_PAGE_MAX)
    try:
        records, next_cursor = jobstore.list_jobs(
            store(), status=status_filter, job_type=type_filter, limit=limit,
            cursor=request.args.get("cursor") or None,
            owner=None if api_common.sees_every_job() else api_common.caller_owner())
    except jobstore.BadCursor:
        raise ApiError(400, "cursor: not a cursor from a previous page (use next_cursor as given)") from None
    jobstore.add_queue_positions(store(), records)
    return jsonify({"jobs": [status_answer(record) for record in records], "next_cursor": next_cursor})


@api.get("/jobs/<job_id>")
def job_detail(job_id: str) -> Response:
    """The status object plus what the dashboard's detail view shows: status history and the result."""
    record = record_or_error(job_id, with_position=True)
    answer = status_answer(record)
    answer["history"] = [{"status": item["status"], "at": iso(str(item["at"]))}
                         for item in jobstore.job_history(store(), job_id)]
    if record["status"] == "success":
        answer["result"] = result_of(record)
    return jsonify(answer)


@api.get("/overview")
def overview() -> Response:
    """Operator numbers for the dashboard: queue, throughput, workers and their nodes, node-seconds. They
    are about every client's jobs, so with keys on only an admin key reads them."""
    if not api_common.sees_every_job():
        raise ApiError(403, "the overview (queue, throughput, workers, nodes) is for admin keys "
                            "(C3_RENDER_ADMIN_KEYS); this key sees its own jobs in /jobs")
    r = store()
    stats = jobstats.counters(r)
    nodes = jobstats.pool(r)
    today_s = jobstats.node_seconds_today(stats, nodes)
    per_job = today_s / stats["finished_today"] if stats["finished_today"] else None
    price = api_common.price_per_hour(settings(), settings().workload_type)
    return jsonify({
        "queue_depth": stats["queue_depth"],
        "running": stats["running"],
        "finished_last_hour": stats["finished_last_hour"],
        "finished_today": stats["finished_today"],
        "jobs_total": [{"type": t, "status": s, "count": n} for (t, s), n in sorted(stats["jobs_total"].items())],
        "workers": jobstats.workers(r, nodes),
        "nodes": nodes,
        "nodes_running": jobstats.nodes_running(nodes),
        "node_seconds_today": today_s,
        "node_seconds_total": jobstats.node_seconds_total(stats, nodes),
        "node_seconds_per_job_today": None if per_job is None else round(per_job, 1),
        "cost_per_job_today": None if per_job is None or price is None else round(per_job * price / 3600, 4),
        "node_time": {kind: round(seconds, 1) for kind, seconds in jobstats.node_time(r).items()},
        "webhook_deliveries": stats["webhook_deliveries"],
        "redis": jobstats.redis_replication(r),
    })


@api.get("/status/<job_id>")
def status(job_id: str) -> Response:
    return jsonify(status_answer(record_or_error(job_id, with_position=True)))


@api.get("/result/<job_id>")
def result(job_id: str) -> Response:
    record = record_or_error(job_id)
    state = record["status"]
    if state not in jobspec.FINISHED_STATUSES:
        raise ApiError(409, f"job is {state}; the result is not ready")
    answer: dict[str, Any] = {"id": record["id"], "status": state}
    if state == "success":
        answer.update(result_of(record))
    else:
        answer["error"] = record.get("error") or state
    return jsonify(answer)


def do_cancel(job_id: str) -> Response:
    record_or_error(job_id)
    outcome = jobstore.cancel(store(), settings(), job_id)
    if outcome == "missing":
        raise ApiError(404, f"no job with id {job_id}")
    return cancel_answer("job", job_id, outcome)


@api.post("/cancel/<job_id>")
def cancel(job_id: str) -> Response:
    return do_cancel(job_id)


@api.post("/jobs/<job_id>/webhook")
def resend_webhook(job_id: str) -> Response:
    record_or_error(job_id)
    return api_common.resend_answer("job", job_id, webhook_state.resend_webhook(store(), job_id))


@api.post("/job/<job_id>")
def update_job(job_id: str) -> Response:
    body = json_body()
    if not isinstance(body, dict) or set(body) != {"status"} or body["status"] != "cancelled":
        raise ApiError(400, 'the only change a client can make is {"status": "cancelled"}')
    return do_cancel(job_id)


# --- result files (local storage mode) ---------------------------------------------------------

@api.get("/files/<name>")
def files(name: str) -> Response:
    secret = localfiles.file_url_secret(store(), settings().file_url_secret)
    expires = request.args.get("expires", "")
    signature = request.args.get("sig", "")
    if not localfiles.verify_file_signature(name, expires, signature, secret):
        raise ApiError(403, "invalid or expired file link")
    path = localfiles.local_file_path(settings(), name)
    if path is None:
        raise ApiError(404, "file not found")
    return send_file(path, mimetype=localfiles.content_type_for(name), conditional=True)


# --- service routes ----------------------------------------------------------------------------

@api.get("/")
def index() -> Response:
    return jsonify({
        "service": "c3-render",
        "version": VERSION,
        "description": "Runs text-to-speech, speech-to-text, talking-portrait video and image "
                       "analysis jobs on Comput3.ai GPU nodes.",
        "submit": sorted(jobspec.SUBMIT_ROUTES),
        "openapi": "/openapi.json",
        "auth_required": bool(settings().all_api_keys),
    })


@api.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz() -> Response:
    try:
        store().ping()
    except redis.RedisError:
        return error_response(503, "not ready: Redis cannot be reached")
    disk = storage.free_space_problem(settings(), include_work_dir=False)
    if disk:
        return error_response(503, f"not ready: disk full: {disk}")
    return jsonify({"status": "ready"})


@api.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(settings()))
