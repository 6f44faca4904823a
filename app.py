"""The c3-render HTTP API: one Flask file.

Takes jobs (POST /csm, /portrait, /api/v1/jobs/whisper (alias /whisper), /analyze), validates them
against jobspec.py and queues them through jobstore.py; answers /status and /result, cancels, serves
local result files on signed URLs, and describes itself at /openapi.json. Run it with
`gunicorn 'app:create_app()'` in production or `flask --app app run` for development.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import time
from datetime import UTC, datetime
from typing import Any

import redis
from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

import config
import jobspec
import jobstore
import storage

log = logging.getLogger("c3-render.api")

VERSION = "0.1.0"
OPEN_ROUTES = ("/", "/healthz", "/readyz", "/openapi.json")
IDEMPOTENCY_HEADER = "Idempotency-Key"
JOB_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"^[!-~]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}$")


class ApiError(Exception):
    """An error answer: HTTP status and message, plus optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def iso(timestamp: str | None) -> str | None:
    if not timestamp:
        return None
    moment = datetime.fromtimestamp(float(timestamp), tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def create_app(settings: config.Settings | None = None) -> Flask:
    settings = settings or config.load()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    r = jobstore.connect(settings.redis_url, timeout_s=2.0)
    app.extensions["c3_settings"] = settings
    app.extensions["c3_redis"] = r

    # --- errors: always JSON, never a stack trace ------------------------------------------
    @app.errorhandler(ApiError)
    def on_api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.errorhandler(redis.RedisError)
    def on_redis_error(exc: redis.RedisError) -> Response:
        log.warning("Redis unavailable: %s", type(exc).__name__)
        return error_response(503, "service unavailable: the job store (Redis) cannot be reached; "
                                   "retry shortly", {"Retry-After": "5"})

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        messages = {
            404: "not found",
            405: f"method {request.method} not allowed on {request.path}",
            413: f"request body too large (limit {settings.max_content_length} bytes)",
        }
        message = messages.get(exc.code or 500, exc.description or exc.name)
        headers = {}
        if getattr(exc, "valid_methods", None):  # 405 keeps its Allow header (RFC 9110)
            headers["Allow"] = ", ".join(exc.valid_methods)
        return error_response(exc.code or 500, message, headers)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal error")

    # --- API keys and rate limits --------------------------------------------------------------
    def client_identity() -> str:
        return g.get("client_id") or f"addr:{request.remote_addr or 'unknown'}"

    @app.before_request
    def check_api_key() -> None:
        if request.path in OPEN_ROUTES or request.path.startswith("/files/"):
            return
        if not settings.api_keys:
            return
        given = request.headers.get("X-C3-RENDER-KEY", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        matched = False
        for key in settings.api_keys:  # compare with every key, in constant time
            matched |= hmac.compare_digest(given.encode(), key.encode())
        if not given or not matched:
            raise ApiError(401, "missing or invalid API key: send X-C3-RENDER-KEY or "
                                "Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
        g.client_id = "key:" + hashlib.sha256(given.encode()).hexdigest()[:16]

    def check_rate_limit() -> None:
        limit = settings.rate_limit_per_minute
        if limit <= 0:
            return
        now = time.time()
        window = int(now // 60)
        key = config.RATE_KEY.format(client=client_identity(), window=window)
        pipe = r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
        if count > limit:
            retry_after = max(1, math.ceil((window + 1) * 60 - now))
            raise ApiError(429, f"rate limit of {limit} jobs per minute exceeded; retry in {retry_after} s",
                           {"Retry-After": str(retry_after)})

    # --- reading requests ------------------------------------------------------------------
    def json_body() -> Any:
        if not request.is_json:
            raise ApiError(415, "send the job as JSON with Content-Type: application/json")
        raw = request.get_data(cache=True)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "malformed JSON in request body") from None

    def record_or_error(job_id: str) -> dict[str, str]:
        if not jobstore.is_job_id(job_id):
            raise ApiError(400, f"malformed job id {job_id[:64]!r}: expected a UUID4")
        record = jobstore.get_job(r, job_id)
        if record is None:
            raise ApiError(404, f"no job with id {job_id} (unknown, or expired after its retention)")
        return record

    # --- job submission --------------------------------------------------------------------
    def submit(job_type: str) -> Response:
        body = json_body()
        try:
            params = jobspec.validate(job_type, body)
        except jobspec.ValidationError as exc:
            raise ApiError(400, str(exc)) from None
        idem_key, body_hash = "", ""
        header = request.headers.get(IDEMPOTENCY_HEADER)
        if header is not None:
            if not IDEMPOTENCY_KEY_PATTERN.match(header):
                raise ApiError(400, f"{IDEMPOTENCY_HEADER}: 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII "
                                    "characters (such as a UUID)")
            body_hash = hashlib.sha256(
                (job_type + "\n" + json.dumps(body, sort_keys=True)).encode()
            ).hexdigest()
            scope = hashlib.sha256(client_identity().encode()).hexdigest()[:16]
            idem_key = config.IDEMPOTENCY_KEY.format(client=scope,
                                                     key=hashlib.sha256(header.encode()).hexdigest())
        check_rate_limit()
        try:
            job_id, created = jobstore.submit(r, job_type, params, idempotency_key=idem_key,
                                              body_hash=body_hash)
        except jobstore.IdempotencyConflict:
            raise ApiError(422, f"{IDEMPOTENCY_HEADER} was already used with a different request body") \
                from None
        if created:
            log.info("job %s (%s) queued", job_id, job_type)
        if created:
            return jsonify({"id": job_id, "status": "queued"})
        record = jobstore.get_job(r, job_id)  # a replay answers with the job's status now
        response = jsonify({"id": job_id, "status": record["status"] if record else "queued"})
        response.headers["Idempotent-Replayed"] = "true"
        return response

    for route, job_type in jobspec.SUBMIT_ROUTES.items():
        app.add_url_rule(route, f"submit_{route}", lambda job_type=job_type: submit(job_type),
                         methods=["POST"])

    # --- following jobs --------------------------------------------------------------------
    @app.get("/status/<job_id>")
    def status(job_id: str) -> Response:
        record = record_or_error(job_id)
        answer: dict[str, Any] = {
            "id": record["id"],
            "type": record["type"],
            "status": record["status"],
            "created_at": iso(record.get("created_at")),
            "started_at": iso(record.get("started_at")),
            "finished_at": iso(record.get("finished_at")),
            "complete_by": iso(record.get("complete_by")),
            "attempts": int(record.get("attempts") or 0),
        }
        if record["status"] in ("failed", "cancelled"):
            answer["error"] = record.get("error") or record["status"]
        if record["status"] == "queued":
            answer["queue_position"] = jobstore.queue_position(r, record)
        if record["status"] == "running":
            if record.get("phase"):
                answer["phase"] = record["phase"]
                answer["phase_since"] = iso(record.get("phase_since"))
            if record.get("progress"):
                answer["progress"] = int(record["progress"])
            if record.get("cancel_requested"):
                answer["cancel_requested"] = True
        if record.get("webhook_status", "none") != "none":
            answer["webhook"] = {
                "status": record["webhook_status"],
                "attempts": int(record.get("webhook_attempts") or 0),
                "last_error": record.get("webhook_error") or None,
            }
        return jsonify(answer)

    @app.get("/result/<job_id>")
    def result(job_id: str) -> Response:
        record = record_or_error(job_id)
        state = record["status"]
        if state not in jobspec.FINISHED_STATUSES:
            raise ApiError(409, f"job is {state}; the result is not ready")
        answer: dict[str, Any] = {"id": record["id"], "status": state}
        if state == "success":
            if record["type"] in jobspec.MEDIA_JOB_TYPES:
                answer["result_url"] = record.get("result_url", "")
            else:
                answer["text"] = record.get("text", "")
        else:
            answer["error"] = record.get("error") or state
        return jsonify(answer)

    def do_cancel(job_id: str) -> Response:
        record_or_error(job_id)
        outcome = jobstore.cancel(r, settings, job_id)
        if outcome == "missing":
            raise ApiError(404, f"no job with id {job_id}")
        if outcome.startswith("finished:"):
            raise ApiError(409, f"job already finished ({outcome.split(':', 1)[1]}); nothing to cancel")
        if outcome == "cancelling":
            return jsonify({"id": job_id, "status": "running", "cancel_requested": True})
        return jsonify({"id": job_id, "status": "cancelled"})

    @app.post("/cancel/<job_id>")
    def cancel(job_id: str) -> Response:
        return do_cancel(job_id)

    @app.post("/job/<job_id>")
    def update_job(job_id: str) -> Response:
        body = json_body()
        if not isinstance(body, dict) or set(body) != {"status"} or body["status"] != "cancelled":
            raise ApiError(400, 'the only change a client can make is {"status": "cancelled"}')
        return do_cancel(job_id)

    # --- result files (local storage mode) --------------------------------------------------
    @app.get("/files/<name>")
    def files(name: str) -> Response:
        secret = jobstore.file_url_secret(r, settings.file_url_secret)
        expires = request.args.get("expires", "")
        signature = request.args.get("sig", "")
        if not storage.verify_file_signature(name, expires, signature, secret):
            raise ApiError(403, "invalid or expired file link")
        path = storage.local_file_path(settings, name)
        if path is None:
            raise ApiError(404, "file not found")
        return send_file(path, mimetype=storage.content_type_for(name), conditional=True)

    # --- service routes --------------------------------------------------------------------
    @app.get("/")
    def index() -> Response:
        return jsonify({
            "service": "c3-render",
            "version": VERSION,
            "description": "Runs text-to-speech, speech-to-text, talking-portrait video and image "
                           "analysis jobs on Comput3.ai GPU nodes.",
            "submit": sorted(jobspec.SUBMIT_ROUTES),
            "openapi": "/openapi.json",
            "auth_required": bool(settings.api_keys),
        })

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            r.ping()
        except redis.RedisError:
            return error_response(503, "not ready: Redis cannot be reached")
        return jsonify({"status": "ready"})

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(settings))

    return app


# --- the OpenAPI document, generated from jobspec.py --------------------------------------------

def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(settings: config.Settings | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document of every route, field, range and error."""
    ok = "application/json"
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "JobAccepted": {
            "type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "status": {"type": "string", "enum": list(jobspec.STATUSES)}},
        },
        "JobStatus": {
            "type": "object",
            "required": ["id", "type", "status", "created_at", "started_at", "finished_at", "complete_by",
                         "attempts"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "type": {"type": "string", "enum": list(jobspec.JOB_TYPES)},
                "status": {"type": "string", "enum": list(jobspec.STATUSES)},
                "created_at": timestamp, "started_at": timestamp, "finished_at": timestamp,
                "complete_by": timestamp,
                "attempts": {"type": "integer", "minimum": 0},
                "error": {"type": "string", "description": "Why the job failed or was cancelled."},
                "queue_position": {"type": ["integer", "null"], "minimum": 1,
                                   "description": "While queued: 1 = runs next."},
                "phase": {"type": "string", "enum": list(jobspec.PHASES),
                          "description": "While running: what the job is doing now."},
                "phase_since": {**timestamp, "description": "When the job entered its phase."},
                "progress": {"type": "integer", "minimum": 0, "maximum": 100,
                             "description": "Percent done within the phase, only where the node reports "
                                            "it (portrait: while encoding)."},
                "cancel_requested": {"type": "boolean"},
                "webhook": {
                    "type": "object", "required": ["status", "attempts", "last_error"],
                    "properties": {
                        "status": {"type": "string",
                                   "enum": ["waiting", "pending", "retrying", "delivered", "failed"]},
                        "attempts": {"type": "integer", "minimum": 0},
                        "last_error": {"type": ["string", "null"]},
                    },
                },
            },
        },
        "JobResult": {
            "type": "object", "required": ["id", "status"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": list(jobspec.FINISHED_STATUSES)},
                "result_url": {"type": "string", "description": "csm and portrait: the file, valid 7 days"},
                "text": {"type": "string", "description": "whisper and analyze: the text"},
                "error": {"type": "string"},
            },
        },
        "CancelAnswer": {
            "type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "status": {"type": "string", "enum": ["cancelled", "running"]},
                           "cancel_requested": {"type": "boolean"}},
        },
    }
    for job_type in jobspec.JOB_TYPES:
        schemas[f"{job_type.capitalize()}Request"] = jobspec.request_schema(job_type)

    job_id_param = {"name": "job_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
                    "description": "A job id as returned on submission (a lower-case UUID4)."}
    common_errors = {
        "401": _error_response("Missing or wrong API key (when C3_RENDER_API_KEYS is set)."),
        "503": _error_response("Redis cannot be reached."),
    }
    paths: dict[str, Any] = {}
    for route, job_type in jobspec.SUBMIT_ROUTES.items():
        paths[route] = {"post": {
            "summary": f"Submit a {job_type} job" + (" (alias)" if route == "/whisper" else ""),
            "operationId": "submit_" + route.strip("/").replace("/", "_"),
            "parameters": [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
                            "description": "Same key and body within 24 h: the same job, queued once."}],
            "requestBody": {"required": True, "content": {ok: {"schema": {
                "$ref": f"#/components/schemas/{job_type.capitalize()}Request"}}}},
            "responses": {
                "200": {"description": "Queued.", "content": {ok: {"schema": {
                    "$ref": "#/components/schemas/JobAccepted"}}}},
                "400": _error_response("Invalid field, unknown field, malformed JSON or a bad "
                                       "Idempotency-Key; the message names the field and allowed range."),
                "413": _error_response("Body larger than MAX_CONTENT_LENGTH."),
                "415": _error_response("Body is not JSON."),
                "422": _error_response("Idempotency-Key reused with a different body."),
                "429": _error_response("Rate limit exceeded; see Retry-After."),
                **common_errors,
            },
        }}
    by_id = {"400": _error_response("Malformed job id."), "404": _error_response("Unknown job id."),
             **common_errors}
    paths["/status/{job_id}"] = {"get": {
        "summary": "Status of a job", "operationId": "status", "parameters": [job_id_param],
        "responses": {"200": {"description": "The job.", "content": {ok: {"schema": {
            "$ref": "#/components/schemas/JobStatus"}}}}, **by_id},
    }}
    paths["/result/{job_id}"] = {"get": {
        "summary": "Result of a finished job", "operationId": "result", "parameters": [job_id_param],
        "responses": {"200": {"description": "Finished.", "content": {ok: {"schema": {
            "$ref": "#/components/schemas/JobResult"}}}},
            "409": _error_response("Not finished yet."), **by_id},
    }}
    cancel_responses = {"200": {"description": "Cancelled, or running and asked to stop.",
                                "content": {ok: {"schema": {"$ref": "#/components/schemas/CancelAnswer"}}}},
                        "409": _error_response("Already finished."), **by_id}
    paths["/cancel/{job_id}"] = {"post": {"summary": "Cancel a job", "operationId": "cancel",
                                          "parameters": [job_id_param], "responses": cancel_responses}}
    paths["/job/{job_id}"] = {"post": {
        "summary": 'Cancel a job (older form, body {"status": "cancelled"})', "operationId": "job_update",
        "parameters": [job_id_param],
        "requestBody": {"required": True, "content": {ok: {"schema": {
            "type": "object", "additionalProperties": False, "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["cancelled"]}}}}}},
        "responses": {**cancel_responses, "415": _error_response("Body is not JSON.")},
    }}
    paths["/files/{name}"] = {"get": {
        "summary": "A result file (local storage mode), on a signed, expiring link",
        "operationId": "files",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
                       {"name": "sig", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file."},
                      "403": _error_response("Invalid or expired link."),
                      "404": _error_response("No such file."),
                      "503": _error_response("Redis cannot be reached.")},
    }}
    def simple_route(summary: str, operation: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        responses = {"200": {"description": summary, "content": {ok: {"schema": {"type": "object"}}}}}
        responses.update(extra or {})
        return {"get": {"summary": summary, "operationId": operation, "responses": responses}}

    paths["/"] = simple_route("Service information", "index")
    paths["/healthz"] = simple_route("The process is alive", "healthz")
    paths["/readyz"] = simple_route("Redis answers", "readyz",
                                    {"503": _error_response("Redis cannot be reached.")})
    paths["/openapi.json"] = simple_route("This OpenAPI 3.1 document", "openapi")
    return {
        "openapi": "3.1.0",
        "info": {"title": "c3-render", "version": VERSION,
                 "description": "AI render jobs on Comput3.ai GPU nodes: submit, follow, fetch results."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "RenderKey": {"type": "apiKey", "in": "header", "name": "X-C3-RENDER-KEY"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{}, {"RenderKey": []}, {"Bearer": []}],
    }
