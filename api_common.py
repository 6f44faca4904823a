"""What every API blueprint shares (app.py, pipelines.py, events.py, metrics.py): the request's settings and
Redis client, the JSON error answer, who is asking (the API key's id, admin or not), reading a submission
(the JSON body, its Idempotency-Key, the rate counter), the 400/404 reading of a job id (another key's job
is a 404 like an unknown id), and the status object of a job record.

app.py's `create_app()` attaches the settings and the client to the Flask app (`attach`); the blueprints
read them back per request with `settings()` and `store()`. This module imports no blueprint, so the
blueprints import it and not each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from flask import Flask, Response, current_app, g, jsonify, request

import config
import jobspec
import jobstore
import webhook_state
from jobspec import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY_LENGTH

log = logging.getLogger("c3-render.api")


class ApiError(Exception):
    """An error answer: HTTP status and message, plus optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON error answer: `{"error": message}` with the status and headers given."""
    response = jsonify({"error": message})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


# --- the app's settings and Redis client -------------------------------------------------------

def attach(app: Flask, app_settings: config.Settings, r: redis.Redis) -> None:
    """Give the app the settings and the Redis client its requests use."""
    app.extensions["c3_settings"] = app_settings
    app.extensions["c3_redis"] = r


def settings() -> config.Settings:
    """The settings of the app handling this request."""
    return current_app.extensions["c3_settings"]


def store() -> redis.Redis:
    """The Redis client of the app handling this request."""
    return current_app.extensions["c3_redis"]


# --- who is asking ------------------------------------------------------------------------------

def set_caller(owner: str, admin: bool) -> None:
    """Record the request's API key (app.check_api_key): its id (a hash, never the key) and whether it is
    an admin key."""
    g.owner = owner
    g.admin = admin


def caller_owner() -> str:
    """The id of the request's API key, which a job it submits records as its owner ('' without a key)."""
    return g.get("owner", "")


def sees_every_job() -> bool:
    """Keys off (everyone sees everything, as before tenancy) or an admin key (C3_RENDER_ADMIN_KEYS)."""
    return not settings().all_api_keys or bool(g.get("admin"))


def may_see(record: dict[str, str]) -> bool:
    """Whether the caller may read and act on this job: its own, or every job for an admin (keys off: all).
    A job without an owner (submitted while keys were off) is an admin's only."""
    owner = caller_owner()
    return sees_every_job() or (bool(owner) and record.get("owner") == owner)


def client_identity() -> str:
    """Who counts as one client for rate limits and idempotency keys: the API key's id, else the address."""
    return g.get("client_id") or f"addr:{request.remote_addr or 'unknown'}"


# --- reading a submission ---------------------------------------------------------------------

def json_body() -> Any:
    """The request's JSON body, or the 415/400 answer (not JSON, malformed, nested too deeply, a lone
    surrogate)."""
    if not request.is_json:
        raise ApiError(415, "send the job as JSON with Content-Type: application/json")
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed JSON in request body") from None
    except RecursionError:
        raise ApiError(400, f"JSON nested too deeply (more than {jobspec.MAX_JSON_DEPTH} levels of arrays "
                            "and objects)") from None
    try:
        jobspec.check_json_shape(body)
    except jobspec.ValidationError as exc:
        raise ApiError(400, str(exc)) from None
    return body


def idempotency(kind: str, params: dict[str, Any]) -> tuple[str, str]:
    """The Redis key of the request's Idempotency-Key (scoped to the client) and the hash of what it
    asks for: the kind of request (a job type, or "pipeline") and its validated parameters (so a field sent
    as null, left out, or sent with its default value is the same request); ("", "") without the header."""
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is None:
        return "", ""
    if not IDEMPOTENCY_KEY_PATTERN.match(header):
        raise ApiError(400, f"{IDEMPOTENCY_HEADER}: 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII "
                            "characters (such as a UUID)")
    asked = json.dumps(params, sort_keys=True, separators=(",", ":"))
    params_hash = hashlib.sha256((kind + "\n" + asked).encode()).hexdigest()
    scope = hashlib.sha256(client_identity().encode()).hexdigest()[:16]
    return config.IDEMPOTENCY_KEY.format(client=scope, key=hashlib.sha256(header.encode()).hexdigest()), params_hash


def rate_counter() -> tuple[str, int]:
    """The Redis counter of this client's submissions in the current minute, and the limit ("", 0: off).
    The submit scripts count there, after they have looked at the Idempotency-Key: replays are free."""
    limit = settings().rate_limit_per_minute
    if limit <= 0:
        return "", 0
    return config.RATE_KEY.format(client=client_identity(), window=int(time.time() // 60)), limit


def rate_limited() -> ApiError:
    """The 429 answer, with the seconds until the next minute's window."""
    now = time.time()
    retry_after = max(1, math.ceil((int(now // 60) + 1) * 60 - now))
    return ApiError(429, f"rate limit of {settings().rate_limit_per_minute} jobs per minute exceeded; retry in "
                         f"{retry_after} s", {"Retry-After": str(retry_after)})


# --- jobs as the API shows them ----------------------------------------------------------------

def submit_answer(write: Callable[[str, int], tuple[str, bool]], created: Callable[[str], dict[str, Any]],
                  replayed: Callable[[str], dict[str, Any] | None], conflict: str) -> Response:
    """The answer of a submit route (a job or a pipeline): write(rate key, limit) -> (id, created) stores
    it; a new one is answered by created(id), an Idempotency-Key replay by replayed(id) (None once its
    record expired, between the script and the read: then it is written anew, once)."""
    for _ in range(2):
        rate_key, limit = rate_counter()
        try:
            ident, new = write(rate_key, limit)
        except jobstore.IdempotencyConflict:
            raise ApiError(422, f"{IDEMPOTENCY_HEADER} was already used with a different request{conflict}") from None
        except jobstore.RateLimited:
            raise rate_limited() from None
        if new:
            return jsonify(created(ident))
        answer = replayed(ident)  # a replay answers with the status now
        if answer is not None:
            response = jsonify(answer)
            response.headers["Idempotent-Replayed"] = "true"
            return response
    raise ApiError(503, "the job store changed under this request; retry it", {"Retry-After": "1"})


def page_limit(default: int, most: int) -> int:
    """A listing's `limit` query parameter (default when absent), or the 400 giving its range."""
    raw = request.args.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise ApiError(400, f"limit: an integer from 1 to {most}")
    return int(raw)


def resend_answer(what: str, ident: str, outcome: str) -> Response:
    """The answer of a webhook resend (POST /jobs/<id>/webhook, POST /pipelines/<id>/webhook) of a job or a
    pipeline (`what`), given webhook_state.resend_webhook's outcome: 202, or the 404/409 saying why not."""
    problems = {
        "missing": (404, f"no {what} with id {ident}"),
        "unfinished": (409, f"the {what} has not finished; its webhook is sent when it does"),
        "no_url": (409, f"the {what} has no notify_url, so there is no webhook to send"),
        "busy": (409, "the webhook is being delivered (pending or retrying); see "
                      f"{'/status' if what == 'job' else 'GET /pipelines/<id>'} for its history"),
        "no_body": (409, f"the {what} finished before its webhook body was kept; there is nothing to send again"),
    }
    if outcome in problems:
        raise ApiError(*problems[outcome])
    log.info("%s %s: webhook queued again on request", what, ident)
    response = jsonify({"id": ident, "webhook": {"status": "pending"}})
    response.status_code = 202
    return response


def cancel_answer(what: str, ident: str, outcome: str) -> Response:
    """The answer of a cancel of a job or pipeline (`what`) from the cancel's outcome: 409 once it finished,
    else cancelled, or still running with the cancel requested (a step or the job is stopping)."""
    if outcome.startswith("finished:"):
        raise ApiError(409, f"{what} already finished ({outcome.split(':', 1)[1]}); nothing to cancel")
    if outcome == "cancelling":
        return jsonify({"id": ident, "status": "running", "cancel_requested": True})
    return jsonify({"id": ident, "status": "cancelled"})


def iso(timestamp: str | None) -> str | None:
    """A stored Unix time as ISO 8601 UTC with milliseconds (None stays None)."""
    if not timestamp:
        return None
    moment = datetime.fromtimestamp(float(timestamp), tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_or_error(job_id: str, with_position: bool = False) -> dict[str, str]:
    """The job's record, or the 400/404 answer; with_position adds a queued job's queue position in the
    same round trip (see jobstore.get_job_with_position). Another API key's job is answered exactly as an
    unknown id, so that a key cannot even learn that a job id exists."""
    return owned_or_error("job", job_id, jobstore.get_job_with_position if with_position else jobstore.get_job)


def owned_or_error(what: str, ident: str, read: Callable[[redis.Redis, str], dict[str, str] | None]) -> dict[str, str]:
    """The record of a job or pipeline (`what`) as read(store, id) gives it, or the 400 of a malformed id,
    or the 404 of an unknown one; another API key's record is a 404 exactly as an unknown id."""
    if not jobstore.is_job_id(ident):
        raise ApiError(400, f"malformed {what} id {ident[:64]!r}: expected a UUID4")
    record = read(store(), ident)
    if record is None or not may_see(record):
        raise ApiError(404, f"no {what} with id {ident} (unknown, or expired after its retention)")
    return record


def job_cost(app_settings: config.Settings, record: dict[str, str]) -> dict[str, Any]:
    """What a job cost: its node-seconds (its share of its node's boot, busy and idle time; it can grow
    until the node stops, by the idle time after the node's last job) and, with C3_PRICE_PER_HOUR, the
    price of those."""
    seconds = float(record.get("node_seconds") or 0)
    found: dict[str, Any] = {"node_seconds": round(seconds, 1), "node_type": record.get("node_type") or None}
    price = price_per_hour(app_settings, record.get("node_type") or "")
    if price is not None:
        found["cost"] = round(seconds * price / 3600, 4)
    return found


def price_per_hour(app_settings: config.Settings, node_type: str) -> float | None:
    """C3_PRICE_PER_HOUR for a node type (its own price, else the one for every type); None when unknown."""
    prices = config.parse_prices(app_settings.price_per_hour)
    return prices.get(node_type, prices.get("*"))


def status_answer(record: dict[str, str]) -> dict[str, Any]:
    """The status object of a job record, as /status shows it."""
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
    if record.get("pipeline"):  # a pipeline's step: which, and (while waiting) the steps it takes inputs from
        answer["pipeline"] = record["pipeline"]
        answer["step"] = record.get("step", "")
        if record["status"] == "waiting":
            answer["waiting_for"] = sorted(set(json.loads(record.get("inputs_from") or "{}").values()))
    if record["status"] == "queued":
        position = record.get("queue_position")  # read with the record, or not yet
        answer["queue_position"] = (jobstore.queue_position(store(), record) if position is None
                                    else int(position) if position else None)
    if record["status"] == "running":
        if record.get("phase"):
            answer["phase"] = record["phase"]
            answer["phase_since"] = iso(record.get("phase_since"))
        if record.get("progress"):
            answer["progress"] = int(record["progress"])
        if record.get("cancel_requested"):
            answer["cancel_requested"] = True
    if record.get("node_seconds"):
        answer.update(job_cost(settings(), record))
    if record.get("webhook_status", "none") != "none":
        answer["webhook"] = webhook_answer(record)
    return answer


def webhook_answer(record: dict[str, str]) -> dict[str, Any]:
    """The final webhook's delivery state of a job (or pipeline) record, as /status shows it."""
    return {
        "status": record["webhook_status"],
        "attempts": int(record.get("webhook_attempts") or 0),
        "last_error": record.get("webhook_error") or None,
        "history": [{**event, "at": iso(str(event.get("at") or 0))}
                    for event in webhook_state.webhook_history(record)],
    }


def result_of(record: dict[str, str]) -> dict[str, str]:
    """A succeeded job's result: {"result_url"} (csm, portrait) or {"text"} (whisper, analyze)."""
    if record["type"] in jobspec.MEDIA_JOB_TYPES:
        return {"result_url": record.get("result_url", "")}
    return {"text": record.get("text", "")}
