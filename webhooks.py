"""Webhook delivery off the job path: the Redis outbox, retries, and Standard Webhooks signatures.

A job's final webhook is queued in `webhooks:outbox` by jobstore.transition() in the same atomic
step that finishes the job, so there is exactly one per job (and `POST /jobs/<id>/webhook` can queue
it again, webhook_state.resend_webhook()). In each worker a taker thread moves entries with BLMOVE into
the worker's in-flight list while fewer than WEBHOOK_CONCURRENCY attempts are under way, and hands
each to an attempt thread (made on demand), which makes one attempt with a total deadline
(WEBHOOK_TIMEOUT_S for connect, headers and all: netfetch.post_json) and settles it in one atomic
step (webhook_state.settle_webhook): delivered, failed for good, or parked in the `webhooks:retry` sorted
set until its next attempt is due (WEBHOOK_SCHEDULE). Due retries rejoin the outbox at the back, so
they never go ahead of deliveries queued before them. Any 2xx counts as delivered.

One receiver cannot hold up the others (`HostSlots`): a receiver host whose last attempt ended
within SLOW_ATTEMPT_S may have up to WEBHOOK_PER_HOST of a worker's attempts under way; a host not
seen yet or slow gets one, and such hosts together never get the last quarter of WEBHOOK_CONCURRENCY,
which stays free for hosts known to answer quickly. An entry whose host is at its cap waits DEFER_S
in the retry set without counting as an attempt. On SIGTERM a worker gives its in-flight entries
back to the outbox unchanged (`stop_delivery`); the sweep does the same for workers that vanished
(`recover_inflight`), and for a worker that stopped while Redis was unreachable (`abandon_delivery`
says how many it left in flight).

Signatures follow the Standard Webhooks scheme: headers webhook-id (the job id, or a pipeline's id for
its final webhook; the same on every attempt so receivers can drop copies), webhook-timestamp and webhook-signature
"v1,<base64 HMAC-SHA256(secret, id.timestamp.body)>". A secret written "whsec_<base64>" is decoded
as the standard says; any other secret is used as its UTF-8 bytes (config.webhook_secret_key, which
refuses at start-up a whsec_ secret that is not standard base64).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis

import config
import jobstore
import netfetch
import redis_conn
import webhook_state

log = logging.getLogger("c3-render.webhooks")

DEFER_S = 0.5  # how long an entry whose receiver host is at its cap waits before it is looked at again
# The taker blocks on the outbox at most this long, so retries scheduled meanwhile by attempt threads
# are moved to the outbox at most this late.
TAKE_WAIT_S = 0.2
SLOW_ATTEMPT_S = 2.0  # an attempt running longer marks its host slow (one thread for it from then on)

def secret_bytes(secret: str) -> bytes:
    """The HMAC key of WEBHOOK_SECRET: config.webhook_secret_key, the rule the settings were checked with."""
    return config.webhook_secret_key(secret)


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


def retry_delays(settings: config.Settings) -> tuple[float, ...]:
    """Seconds to wait before each retry: WEBHOOK_SCHEDULE, or WEBHOOK_ATTEMPTS - 1 times
    WEBHOOK_INTERVAL_S (the older pair of settings, used when WEBHOOK_SCHEDULE is unset)."""
    if settings.webhook_schedule:
        return settings.webhook_schedule
    return (settings.webhook_interval_s,) * max(0, settings.webhook_attempts - 1)


def receiver_host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


@dataclass
class HostSlots:
    """How many of one worker's concurrent attempts each receiver host may have (see the module doc)."""

    per_host: int
    concurrency: int  # attempts at once in this worker
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: dict[str, list[float]] = field(default_factory=dict)  # host -> start times of attempts
    fast: set[str] = field(default_factory=set)  # hosts whose last attempt ended within SLOW_ATTEMPT_S
    untrusted_busy: int = 0  # attempts under way to hosts not in `fast`

    def take(self, host: str) -> tuple[str, float, bool] | None:
        """A slot for one attempt to host, or None when host has its share already."""
        now = time.monotonic()
        with self.lock:
            running = self.started.setdefault(host, [])
            trusted = host in self.fast and not any(now - t > SLOW_ATTEMPT_S for t in running)
            if len(running) >= (self.per_host if trusted else 1):
                return None
            if not trusted and self.untrusted_busy >= max(1, self.concurrency - self.concurrency // 4):
                return None
            running.append(now)
            self.untrusted_busy += 0 if trusted else 1
            return host, now, trusted

    def busy(self) -> int:
        """Attempts under way."""
        with self.lock:
            return sum(len(times) for times in self.started.values())

    def give_back(self, slot: tuple[str, float, bool]) -> None:
        host, started, trusted = slot
        now = time.monotonic()
        with self.lock:
            self.started[host].remove(started)
            if not self.started[host]:
                del self.started[host]
            self.untrusted_busy -= 0 if trusted else 1
            if now - started <= SLOW_ATTEMPT_S:
                if len(self.fast) >= 100_000:  # bounded memory; hosts prove themselves again
                    self.fast.clear()
                self.fast.add(host)
            else:
                self.fast.discard(host)


@dataclass
class InFlight:
    """How many deliveries this worker holds in its in-flight list unsettled (taken, not yet recorded):
    what a stop without Redis leaves for the sweep."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0

    def add(self, delta: int) -> None:
        with self.lock:
            self.count += delta


class Unsettled(Exception):
    """A delivery was attempted but Redis failed before its outcome was written; call settle() again."""

    def __init__(self, settle: Callable[[], None]) -> None:
        super().__init__("webhook outcome not recorded")
        self.settle = settle


def take_next(r: redis.Redis, worker_id: str, wait_s: float = 1.0, slots: HostSlots | None = None,
              stop: threading.Event | None = None) -> tuple[str, tuple[str, float, bool] | None] | None:
    """Move due retries to the outbox, then take the next delivery into our in-flight list: (entry,
    its HostSlots slot), or None when there was none, or its host had its share (then it waits
    DEFER_S in the retry set, not counted as an attempt). Raises Unsettled if Redis fails mid-way."""
    now = time.time()
    next_due = webhook_state.move_due_retries(r, now)  # a retry never overtakes an earlier delivery
    if next_due:
        wait_s = min(wait_s, max(0.05, float(next_due) - now))
    inflight = webhook_state.webhook_inflight_key(worker_id)
    raw = r.blmove(config.WEBHOOK_OUTBOX_KEY, inflight, wait_s, "RIGHT", "LEFT")
    if raw is None:
        return None
    if stop is not None and stop.is_set():  # taken as we were told to stop: it goes back as it was
        webhook_state.return_inflight(r, worker_id)
        return None
    if slots is None:
        return raw, None
    slot = slots.take(receiver_host(json.loads(raw)["url"]))
    if slot is not None:
        return raw, slot

    def defer() -> None:
        pipe = r.pipeline(transaction=True)
        pipe.zadd(config.WEBHOOK_RETRY_KEY, {raw: time.time() + DEFER_S})
        pipe.lrem(inflight, 1, raw)
        pipe.execute()

    try:
        defer()
    except redis.RedisError as exc:
        raise Unsettled(defer) from exc
    return None


def attempt_and_settle(r: redis.Redis, settings: config.Settings, worker_id: str, raw: str) -> None:
    """Make one attempt for a taken entry and record its outcome in one atomic step.

    Raises Unsettled when Redis fails after the attempt: the entry is still in our in-flight list,
    where no one else would look while we live, so the caller must retry settle() once Redis answers.
    """
    entry = json.loads(raw)
    job_id = entry["job_id"]
    number = int(entry.get("attempt", 0)) + 1
    delays = retry_delays(settings)
    attempts = len(delays) + 1
    error = attempt(settings, entry)
    if not error:
        outcome, retry_entry, retry_at = "delivered", "", 0.0
    elif number >= attempts:
        outcome, retry_entry, retry_at = "failed", "", 0.0
    else:
        outcome, retry_entry = "retrying", json.dumps({**entry, "attempt": number})
        retry_at = time.time() + delays[number - 1]

    recorded = [False]  # by an earlier run whose replicas did not confirm it (REDIS_MIN_REPLICA_ACKS)

    def settle() -> None:  # one atomic step; a second run after a lost reply changes nothing
        try:
            settled = webhook_state.settle_webhook(r, worker_id, raw, job_id, outcome, number, error, retry_entry,
                                                   retry_at, entry.get("record", ""))
        except redis_conn.NotReplicated as exc:
            recorded[0] = recorded[0] or bool(exc.result)
            raise
        if not settled and not recorded[0]:
            log.info("webhook for job %s: outcome of attempt %d not recorded, the delivery was given back "
                     "to the outbox meanwhile (it will be sent again with the same webhook-id)", job_id, number)

    if outcome == "delivered":
        log.info("webhook for job %s delivered (attempt %d/%d)", job_id, number, attempts)
    elif outcome == "failed":
        log.warning("webhook for job %s failed for good after %d attempts: %s", job_id, number, error)
    else:
        log.info("webhook for job %s attempt %d/%d failed: %s; next in %.0f s", job_id, number, attempts,
                 error, delays[number - 1])
    try:
        settle()
    except redis.RedisError as exc:
        raise Unsettled(settle) from exc


def deliver_next(r: redis.Redis, settings: config.Settings, worker_id: str, wait_s: float = 1.0) -> bool:
    """Take the next delivery and make one attempt, in this thread (no per-host limits)."""
    taken = take_next(r, worker_id, wait_s)
    if taken is None:
        return False
    attempt_and_settle(r, settings, worker_id, taken[0])
    return True


@dataclass
class Senders:
    """One worker's delivery: a taker thread that takes entries while an attempt slot is free, and
    attempt threads (made on demand, up to WEBHOOK_CONCURRENCY) sharing one Redis client."""

    taker: threading.Thread
    slots: HostSlots
    executor: ThreadPoolExecutor
    in_flight: InFlight


def _attempt_in_thread(r: redis.Redis, settings: config.Settings, worker_id: str, raw: str,
                       slot: tuple[str, float, bool] | None, slots: HostSlots, free: threading.Semaphore,
                       stop: threading.Event, in_flight: InFlight) -> None:
    try:
        try:
            attempt_and_settle(r, settings, worker_id, raw)
            in_flight.add(-1)
        except Unsettled as unsettled:
            if slot is not None:
                slots.give_back(slot)
                slot = None
            backoff = 0.5
            while not stop.is_set():  # on stop, stop_delivery gives the entry back instead
                stop.wait(backoff)
                try:
                    unsettled.settle()
                    in_flight.add(-1)
                    break
                except redis.RedisError:
                    backoff = min(backoff * 2, 10.0)
        except Exception:  # noqa: BLE001 - one delivery must not kill its thread silently
            log.exception("webhook delivery failed unexpectedly; the entry stays in flight until returned")
    finally:
        if slot is not None:
            slots.give_back(slot)
        free.release()


def taker_loop(settings: config.Settings, worker_id: str, stop: threading.Event, slots: HostSlots,
               executor: ThreadPoolExecutor, concurrency: int, in_flight: InFlight) -> None:
    """Take deliveries while fewer than `concurrency` attempts are under way; survives Redis outages."""
    r = redis_conn.connect(settings)
    shared = redis_conn.connect(settings)  # for the attempt threads (its pool is thread-safe)
    free = threading.Semaphore(concurrency)
    backoff = 0.5
    unsettled: Callable[[], None] | None = None
    while not stop.is_set():
        if not free.acquire(timeout=0.5):
            continue
        handed_over = False
        try:
            # before every take (the sweep may have dropped us while our heartbeat lapsed): the sweep
            # checks the in-flight lists of every sender
            r.sadd(config.WEBHOOK_SENDERS_KEY, worker_id)
            if unsettled is not None:
                unsettled()
                unsettled = None
                in_flight.add(-1)
            taken = take_next(r, worker_id, TAKE_WAIT_S, slots, stop)
            if taken is not None:
                in_flight.add(1)
                executor.submit(_attempt_in_thread, shared, settings, worker_id, taken[0], taken[1], slots, free,
                                stop, in_flight)
                handed_over = True
            backoff = 0.5
        except (redis.RedisError, Unsettled) as exc:
            if isinstance(exc, Unsettled):
                unsettled = exc.settle
                in_flight.add(1)  # a deferral not recorded: the entry is still in our in-flight list
            log.warning("webhook delivery: Redis unavailable (%s); retrying in %.1f s", type(exc).__name__,
                        backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
        finally:
            if not handed_over:
                free.release()


def start_delivery(settings: config.Settings, worker_id: str, stop: threading.Event,
                   concurrency: int | None = None) -> Senders:
    """Start delivering: up to WEBHOOK_CONCURRENCY (or `concurrency`) attempts at once."""
    concurrency = concurrency or settings.webhook_concurrency
    slots = HostSlots(per_host=settings.webhook_per_host, concurrency=concurrency)
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")
    in_flight = InFlight()
    taker = threading.Thread(target=taker_loop, args=(settings, worker_id, stop, slots, executor, concurrency,
                                                      in_flight),
                             name="webhook-taker", daemon=True)
    taker.start()
    return Senders(taker=taker, slots=slots, executor=executor, in_flight=in_flight)


def stop_delivery(r: redis.Redis, worker_id: str, stop: threading.Event, senders: Senders,
                  wait_s: float = 2.0, retry_waits: tuple[float, ...] = (0.5, 1.0, 2.0)) -> int | None:
    """Graceful stop: let attempts under way finish for up to wait_s, then give every delivery still in
    this worker's in-flight list back to the outbox unchanged (same webhook-id, attempt count kept),
    trying again after each of retry_waits (seconds) while Redis does not answer. An attempt that ends
    later finds its entry gone and records nothing. Returns how many went back, or None when Redis did
    not answer (the caller says so; see abandon_delivery)."""
    stop.set()
    deadline = time.monotonic() + wait_s
    senders.taker.join(max(0.0, deadline - time.monotonic()))
    while senders.slots.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    senders.executor.shutdown(wait=False, cancel_futures=True)
    returned = 0
    for wait in (*retry_waits, None):
        try:
            returned = webhook_state.return_inflight(r, worker_id)
            r.srem(config.WEBHOOK_SENDERS_KEY, worker_id)
            break
        except redis.RedisError:
            if wait is None:
                return None
            time.sleep(wait)
    if returned:
        log.info("gave %d in-flight webhook deliveries back to the outbox", returned)
    return returned


def abandon_delivery(stop: threading.Event, senders: Senders) -> int:
    """Stop without Redis (it does not answer): nothing can be handed back, so nothing waits for it.
    Returns how many deliveries stay in this worker's in-flight list; the recovery sweep of a live worker
    gives them back to the outbox once Redis answers and this worker's heartbeat has expired."""
    stop.set()
    senders.executor.shutdown(wait=False, cancel_futures=True)
    return senders.in_flight.count


def recover_inflight(r: redis.Redis) -> int:
    """For the sweep: give the in-flight deliveries of every sender whose heartbeat is gone (killed,
    or stopped without handing them back) back to the outbox. Returns how many."""
    returned = 0
    for worker in r.smembers(config.WEBHOOK_SENDERS_KEY):
        if r.exists(jobstore.heartbeat_key(worker)):
            continue
        moved = webhook_state.return_inflight(r, worker)
        if moved:
            log.info("gave %d in-flight webhook deliveries of vanished worker %s back to the outbox", moved,
                     worker)
        returned += moved
        r.srem(config.WEBHOOK_SENDERS_KEY, worker)
    return returned
