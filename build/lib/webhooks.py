"""Webhook delivery off the job path: the Redis outbox, retries, and Standard Webhooks signatures.

A job's final webhook is queued in `webhooks:outbox` by jobstore.transition() in the same atomic
step that finishes the job, so there is exactly one per job. Delivery threads in every worker take
entries with BLMOVE into their own in-flight list (a crash puts them back in the outbox through the
recovery sweep), make one attempt, and park failed ones in a sorted set until their next attempt is
due, so a dead receiver never holds up jobs or other webhooks. Any 2xx counts as delivered.

Signatures follow the Standard Webhooks scheme: headers webhook-id (the job id, the same on every
attempt so receivers can drop copies), webhook-timestamp and webhook-signature
"v1,<base64 HMAC-SHA256(secret, id.timestamp.body)>". A secret written "whsec_<base64>" is decoded
as the standard says; any other secret is used as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

import config
import jobstore
import netfetch

log = logging.getLogger("c3-render.webhooks")

# Moves deliveries whose next attempt is due from the retry set back to the outbox.
_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, entry in ipairs(due) do
  redis.call('ZREM', KEYS[1], entry)
  redis.call('RPUSH', KEYS[2], entry)
end
return #due
"""


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature header value for one delivery."""
    message = f"{webhook_id}.{timestamp}.{body}".encode()
    digest = hmac.new(secret_bytes(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: str, tolerance_s: int = 300) -> bool:
    """Check a delivery as a receiver would (used by the tests and documented in the README)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lowered["webhook-timestamp"])
        webhook_id = lowered["webhook-id"]
        signatures = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, webhook_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)


def delivery_headers(settings: config.Settings, webhook_id: str, body: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "c3-render-webhooks/1",
               "webhook-id": webhook_id}
    timestamp = int(time.time())
    headers["webhook-timestamp"] = str(timestamp)
    if settings.webhook_secret:
        headers["webhook-signature"] = sign(settings.webhook_secret, webhook_id, timestamp, body)
    return headers


def attempt(settings: config.Settings, entry: dict[str, Any]) -> str:
    """Send one delivery; return '' on success, else what went wrong (never a secret)."""
    headers = delivery_headers(settings, entry["job_id"], entry["body"])
    try:
        status = netfetch.post_json(
            entry["url"], entry["body"].encode(), headers, field="notify_url",
            allowlist=settings.url_allowlist, timeout=settings.webhook_timeout_s,
        )
    except netfetch.FetchError as exc:
        return str(exc)
    if 200 <= status < 300:
        return ""
    return f"receiver answered HTTP {status}"


class Unsettled(Exception):
    """A delivery was attempted but Redis failed before its outcome was written; call settle() again."""

    def __init__(self, settle: Callable[[], None]) -> None:
        super().__init__("webhook outcome not recorded")
        self.settle = settle


def deliver_next(r: redis.Redis, settings: config.Settings, worker_id: str, wait_s: float = 1.0) -> bool:
    """Move due retries to the outbox, then make one attempt for the next delivery, if any.

    Raises Unsettled when Redis fails after the attempt: the entry is still in our in-flight list,
    where no one else would look while we live, so the caller must retry settle() once Redis answers.
    """
    r.eval(_DUE_LUA, 2, config.WEBHOOK_RETRY_KEY, config.WEBHOOK_OUTBOX_KEY, repr(time.time()))
    inflight = config.WEBHOOK_INFLIGHT_KEY.format(worker=worker_id)
    raw = r.blmove(config.WEBHOOK_OUTBOX_KEY, inflight, wait_s, "RIGHT", "LEFT")
    if raw is None:
        return False
    entry = json.loads(raw)
    number = int(entry.get("attempt", 0)) + 1
    error = attempt(settings, entry)
    job_id = entry["job_id"]

    def settle() -> None:  # every step is idempotent, so it may run again after a Redis error
        if not error:
            jobstore.record_webhook(r, job_id, "delivered", number)
            r.lrem(inflight, 1, raw)
        elif number >= settings.webhook_attempts:
            jobstore.record_webhook(r, job_id, "failed", number, error)
            r.lrem(inflight, 1, raw)
        else:
            jobstore.record_webhook(r, job_id, "retrying", number, error)
            pipe = r.pipeline(transaction=True)
            pipe.zadd(config.WEBHOOK_RETRY_KEY, {json.dumps({**entry, "attempt": number}):
                                                 time.time() + settings.webhook_interval_s})
            pipe.lrem(inflight, 1, raw)
            pipe.execute()

    if not error:
        log.info("webhook for job %s delivered (attempt %d/%d)", job_id, number, settings.webhook_attempts)
    elif number >= settings.webhook_attempts:
        log.warning("webhook for job %s failed for good after %d attempts: %s", job_id, number, error)
    else:
        log.info("webhook for job %s attempt %d/%d failed: %s; next in %.0f s", job_id, number,
                 settings.webhook_attempts, error, settings.webhook_interval_s)
    try:
        settle()
    except redis.RedisError as exc:
        raise Unsettled(settle) from exc
    return True


def delivery_loop(settings: config.Settings, worker_id: str, stop: threading.Event) -> None:
    """Deliver webhooks until stop is set; survives Redis outages by backing off."""
    r = jobstore.connect(settings.redis_url)
    backoff = 0.5
    unsettled: Callable[[], None] | None = None
    while not stop.is_set():
        try:
            if unsettled is not None:
                unsettled()
                unsettled = None
            deliver_next(r, settings, worker_id)
            backoff = 0.5
        except (redis.RedisError, Unsettled) as exc:
            if isinstance(exc, Unsettled):
                unsettled = exc.settle
            log.warning("webhook delivery: Redis unavailable (%s); retrying in %.1f s", type(exc).__name__,
                        backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)


def start_delivery_threads(settings: config.Settings, worker_id: str, stop: threading.Event,
                           count: int = 2) -> list[threading.Thread]:
    threads = []
    for number in range(count):
        thread = threading.Thread(target=delivery_loop, args=(settings, f"{worker_id}", stop),
                                  name=f"webhooks-{number}", daemon=True)
        thread.start()
        threads.append(thread)
    return threads
