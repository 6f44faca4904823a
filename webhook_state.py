"""The webhook delivery state in Redis, beside webhooks.py which sends (key names come from config.py):

- `webhooks:outbox` (WEBHOOK_OUTBOX_KEY): deliveries waiting for a sender. jobstore.transition() queues a
  finished job's one final webhook there (its body from webhook_body()); resend_webhook() queues it again.
  A finished pipeline's webhook (lua/lib/finish_pipeline.lua) names its record in the entry (`record`).
- `webhooks:inflight:<worker>` (WEBHOOK_INFLIGHT_KEY): the deliveries a worker is sending. settle_webhook()
  takes an entry off it and records the attempt in one step; return_inflight() gives them all back.
- `webhooks:retry` (WEBHOOK_RETRY_KEY): deliveries waiting for their next attempt, scored by its time;
  move_due_retries() moves the due ones to the outbox.
- on the job hash: webhook_status, webhook_attempts, webhook_error, webhook_updated_at and the bounded
  `webhook_history` JSON list (WEBHOOK_HISTORY_MAX events); the outcome counters of /metrics
  (WEBHOOK_OUTCOMES_KEY).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

import config
import redis_lua
from jobspec import FINISHED_STATUSES


def webhook_body(job_id: str, status: str, fields: dict[str, Any]) -> str:
    """The final webhook payload, exactly as the spec gives it (a cancel is reported as a failure)."""
    if status == "success":
        payload: dict[str, Any] = {"id": job_id, "status": "success"}
        if fields.get("result_url"):
            payload["result_url"] = fields["result_url"]
        else:
            payload["text"] = fields.get("text", "")
    else:
        payload = {"id": job_id, "status": "failed", "error": fields.get("error", status)}
    return json.dumps(payload, separators=(",", ":"))


def webhook_inflight_key(worker_id: str) -> str:
    return config.WEBHOOK_INFLIGHT_KEY.format(worker=worker_id)


def settle_webhook(r: redis.Redis, worker_id: str, raw_entry: str, job_id: str, outcome: str, attempt: int,
                   error: str = "", retry_entry: str = "", retry_at: float = 0.0, record_key: str = "") -> bool:
    """Record one attempt's outcome (status fields and a webhook_history event) and take the entry off
    the worker's in-flight list, scheduling retry_entry at retry_at if given; all in one step. False
    (nothing changed) when the entry was given back to the outbox meanwhile, or settled already. The state
    is kept on the job's record, or on record_key (the entry's `record`: a pipeline's webhook)."""
    keys = (webhook_inflight_key(worker_id), record_key or config.JOB_KEY.format(id=job_id),
            config.WEBHOOK_RETRY_KEY, config.WEBHOOK_OUTCOMES_KEY)
    return bool(redis_lua.run(r, "settle_webhook", keys, raw_entry, outcome, str(attempt), error[:500],
                              repr(time.time()), retry_entry, repr(retry_at), config.WEBHOOK_HISTORY_MAX, job_id,
                              confirm=True))


def resend_webhook(r: redis.Redis, job_id: str, *, pipeline: bool = False) -> str:
    """Queue a finished job's (or with pipeline, a pipeline's) final webhook again (same body and
    webhook-id) after it was delivered or failed for good. Returns 'queued', 'missing', 'unfinished',
    'no_url', 'busy' (being sent) or 'no_body' (a pipeline that finished before its body was kept)."""
    key = (config.PIPELINE_KEY if pipeline else config.JOB_KEY).format(id=job_id)
    record = r.hgetall(key)
    if not record:
        return "missing"
    if pipeline:  # built by finish_pipeline.lua with each step's result, kept on the record
        body = record.get("webhook_body", "")
    else:
        body = webhook_body(job_id, record["status"], record) if record["status"] in FINISHED_STATUSES else ""
    return str(redis_lua.run(r, "resend_webhook", (key, config.WEBHOOK_OUTBOX_KEY), job_id, body,
                             repr(time.time()), config.WEBHOOK_HISTORY_MAX, key if pipeline else "", confirm=True))


def return_inflight(r: redis.Redis, worker_id: str) -> int:
    """Give a worker's in-flight webhook deliveries back to the outbox unchanged (same webhook-id and
    attempt count), to be taken next. Returns how many."""
    return int(redis_lua.run(r, "return_inflight", (webhook_inflight_key(worker_id), config.WEBHOOK_OUTBOX_KEY)))


def move_due_retries(r: redis.Redis, now: float) -> str:
    """Move the deliveries whose next attempt is due to the outbox; return when the next retry falls due
    (unix seconds as text, '' when none is waiting)."""
    return redis_lua.run(r, "move_due_webhooks", (config.WEBHOOK_RETRY_KEY, config.WEBHOOK_OUTBOX_KEY), repr(now))


def webhook_history(record: dict[str, str]) -> list[dict[str, Any]]:
    """The job's delivery events, oldest first: {"at": unix seconds, "attempt": n, "outcome": ...,
    "error": ... (when there was one)}; outcome is delivered, retrying, failed or resend requested."""
    try:
        history = json.loads(record.get("webhook_history") or "[]")
    except ValueError:
        return []
    return history if isinstance(history, list) else []
