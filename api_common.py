"""What every API blueprint shares (app.py, events.py, metrics.py): the request's settings and Redis
client, the JSON error answer, who is asking (the API key's id, admin or not), the 400/404 reading of a
job id (another key's job is a 404 like an unknown id), and the status object of a job record.

app.py's `create_app()` attaches the settings and the client to the Flask app (`attach`); the blueprints
read them back per request with `settings()` and `store()`. This module imports no blueprint, so the
blueprints import it and not each other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from flask import Flask, Response, current_app, g, jsonify

import config
import jobstore
import webhook_state


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


# --- jobs as the API shows them ----------------------------------------------------------------

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
    if not jobstore.is_job_id(job_id):
        raise ApiError(400, f"malformed job id {job_id[:64]!r}: expected a UUID4")
    read = jobstore.get_job_with_position if with_position else jobstore.get_job
    record = read(store(), job_id)
    if record is None or not may_see(record):
        raise ApiError(404, f"no job with id {job_id} (unknown, or expired after its retention)")
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
        answer["webhook"] = {
            "status": record["webhook_status"],
            "attempts": int(record.get("webhook_attempts") or 0),
            "last_error": record.get("webhook_error") or None,
            "history": [{**event, "at": iso(str(event.get("at") or 0))}
                        for event in webhook_state.webhook_history(record)],
        }
    return answer
