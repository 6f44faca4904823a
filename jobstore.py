"""The job store and the queue protocol in Redis, shared by the API and the worker (key names come
from config.py; the scripts are lua/*.lua, run through redis_lua.py):

- `job:<id>` hashes (JOB_KEY), one per job; every status change goes through `transition()` (the
  transition script), which refuses to change a finished job and queues the job's one final webhook
  (webhook_state.py) atomically.
- ownership: a worker starts a job with `claim()`, which gives it the attempt number; every later change
  it makes (its final status, a put back, progress and phase) names the worker and that attempt and is
  refused unless the job still runs there in that attempt: a worker the sweep took for dead, whose job
  went back to the queue (and maybe to another worker), changes nothing.
- `queue:jobs` (QUEUE_KEY), the one queue: submit LPUSHes, workers take from the right with BLMOVE into
  their own `processing:<worker>` list (PROCESSING_KEY) and acknowledge by removing the entry. Entries
  leave the queue only from the right: a cancel marks the job cancelled and leaves its entry (a
  tombstone) for the worker that takes it to drop, so cancel and /status never scan the list.
- queue slots, so that a queued job's position costs O(log N): every place in the queue has an integer
  slot. The left end is always slot -P (P = `queue:jobs:pushes`, LPUSHes ever), so the right end is
  -P + LLEN - 1; a submit lands on -P, a requeue (RPUSH) on right + 1. A job keeps its slot in
  `queue_slot`. An RPUSH can land on a slot an earlier entry left (taken from the right), so RPUSHes are
  noted in `queue:jobs:requeued` (id -> slot): a job is still in the queue iff its slot <= right end and
  no other entry was RPUSHed onto that slot since. Position = slots from the right end to the job's,
  minus the tombstones among them (`queue:jobs:cancelled`, id -> slot). (lua/lib/queue_slots.lua)
- worker heartbeats (`worker:<id>:alive`, HEARTBEAT_KEY; the `workers` set) and `requeue_abandoned()`,
  which gives the jobs of dead workers back to the queue (or fails them after MAX_ATTEMPTS).
- pipeline steps (pipelines.py): a step is a job with a `pipeline` field; one whose inputs are not there yet
  is `waiting` and in no queue (so every queued job is in the queue), and the transition script that
  finishes a step queues or fails the steps that take its outputs (lua/lib/pipeline_step.lua).
- the GET /jobs indexes (time-ordered sorted sets), each job's status history, the /metrics counters and
  the pub/sub wake-ups of /events: all kept by the same scripts that change a job (lua/lib/job_changed.lua,
  lua/lib/job_finished.lua).

The node bookkeeping (the pool, launches) is nodestore.py's; the webhook delivery state is
webhook_state.py's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

import config
import nodestore
import redis_conn
import redis_lua
import webhook_state
from jobspec import FINISHED_STATUSES, JOBS_CURSOR_PATTERN, PHASES

QUEUE_KEYS = (config.QUEUE_KEY, config.QUEUE_PUSHES_KEY, config.QUEUE_REQUEUED_KEY, config.QUEUE_CANCELLED_KEY)

# --- submission and reading (API side) --------------------------------------------------------

class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


class RateLimited(Exception):
    """The client has submitted its RATE_LIMIT_PER_MINUTE jobs this minute; nothing was written."""


RATE_WINDOW_TTL_S = 120  # a rate counter outlives its minute, so the count of the minute is never lost early


def submit(
    r: redis.Redis,
    job_type: str,
    params: dict[str, Any],
    now: float | None = None,
    *,
    idempotency_key: str = "",
    request_hash: str = "",
    idempotency_ttl_s: int = 24 * 3600,
    owner: str = "",
    rate_key: str = "",
    rate_limit: int = 0,
) -> tuple[str, bool]:
    """Write the job record and its queue entry in one script (one round trip); return (job id, created).

    With idempotency_key (already scoped to the client), a repeat of the same request (request_hash,
    the hash of its validated parameters) returns the first job's id and queues nothing (created False); a
    different request raises IdempotencyConflict. A key whose job no longer exists (its record expired)
    is unused again: the request queues a new job. owner is the id of the API key that submits the job
    (never the key; "" without keys): the record keeps it and the job is listed in that owner's index
    too. With rate_limit, rate_key (the client's counter of this minute) counts the submission and one
    over the limit raises RateLimited; replays and conflicts are not counted. With
    REDIS_MIN_REPLICA_ACKS, raises redis_conn.NotReplicated when the replicas did not confirm the job
    (or, for a repeat, the first one) within REDIS_FAILOVER_WAIT_S: it may or may not outlive a failover,
    and a repeat with the same Idempotency-Key tells which (the same id, or a new job).
    """
    now = time.time() if now is None else now
    job_id = str(uuid.uuid4())
    stored = {k: v for k, v in params.items() if k not in ("notify_url", "max_time", "complete_in")}
    seen = json.dumps({"job_id": job_id, "request_hash": request_hash}) if idempotency_key else ""
    # the record's fields are set by the script (lua/submit.lua); queue_entry() gives the same entry.
    # Sent again with the same id through a failover (a record with this id is this submit's own).
    keys = (job_key(job_id), config.QUEUE_KEY, config.QUEUE_PUSHES_KEY, idempotency_key or config.QUEUE_PUSHES_KEY,
            rate_key or config.QUEUE_PUSHES_KEY)
    args = (seen, idempotency_ttl_s, job_id, job_type, json.dumps(stored), repr(now), repr(now + params["complete_in"]),
            str(params["max_time"]), params.get("notify_url") or "", owner, rate_limit if rate_key else 0,
            RATE_WINDOW_TTL_S)
    first = redis_conn.through_failover(r, lambda: redis_lua.run(r, "submit", keys, *args, confirm=True))
    if not first:
        return job_id, True
    if first == "rate_limited":
        raise RateLimited()
    first = json.loads(first)
    # (a record of an older API hashed the raw body; a pipeline's record, another kind of request, names no job)
    if first.get("request_hash") != request_hash:
        raise IdempotencyConflict(first.get("job_id") or first.get("pipeline_id"))
    return first["job_id"], first["job_id"] == job_id


def get_job(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    record = r.hgetall(job_key(job_id))
    return record or None


def get_job_with_position(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    """The record, and for a queued job its queue position in the same round trip, under the key
    "queue_position" (not a stored field: the number as text, '' when the entry is no longer in the
    queue). What /status reads; queue_position() explains the count."""
    pairs = redis_lua.run(r, "record_with_position", (job_key(job_id), *QUEUE_KEYS), job_id)
    return dict(zip(pairs[::2], pairs[1::2], strict=True)) or None


def get_jobs_with_positions(r: redis.Redis, job_ids: list[str]) -> list[dict[str, str] | None]:
    """get_job_with_position() for many jobs in one round trip (a pipeline's steps), in order."""
    answers = redis_lua.run_many(r, "record_with_position", [((job_key(job_id), *QUEUE_KEYS), (job_id,))
                                                             for job_id in job_ids])
    records: list[dict[str, str] | None] = []
    for pairs in answers:
        if isinstance(pairs, Exception):
            raise pairs
        records.append(dict(zip(pairs[::2], pairs[1::2], strict=True)) or None)
    return records


# --- GET /jobs: newest first from the time-ordered indexes -------------------------------------

class BadCursor(ValueError):
    """A GET /jobs cursor that this API did not hand out."""


def job_cursor(created_at: float, job_id: str) -> str:
    return f"{created_at!r}_{job_id}"


def parse_cursor(cursor: str) -> tuple[float, str]:
    if not re.match(JOBS_CURSOR_PATTERN, cursor):
        raise BadCursor(cursor)
    score, _, job_id = cursor.partition("_")
    return float(score), job_id


def list_jobs(
    r: redis.Redis, *, status: str | None = None, job_type: str | None = None, limit: int = 50,
    cursor: str | None = None, scan_budget: int = 2000, owner: str | None = None,
) -> tuple[list[dict[str, str]], str | None]:
    """Job records newest first, and the cursor of the next page (None at the end).

    Reads the status index (or the type index, or the index of all jobs) from the cursor on, so a page
    costs O(limit). With owner (an API key's id) it reads that owner's index instead: only that key's
    jobs. Status and type together, or either with an owner, filter the index read by the rest; a page
    then reads at most scan_budget entries and may come back short, with a cursor to go on from. Entries
    whose record has expired are dropped from the index on the way. Stable under inserts: new jobs sort
    before the cursor, so they never shift a later page.
    """
    if owner is not None:
        index = config.JOBS_BY_OWNER_KEY.format(owner=owner)
    elif status:
        index = config.JOBS_BY_STATUS_KEY.format(status=status)
    elif job_type:
        index = config.JOBS_BY_TYPE_KEY.format(type=job_type)
    else:
        index = config.JOBS_INDEX_KEY
    def wanted(record: dict[str, str]) -> bool:
        return (not status or record.get("status") == status) and \
            (not job_type or record.get("type") == job_type) and (owner is None or record.get("owner") == owner)

    return read_index(r, index, job_key, limit=limit, cursor=cursor, wanted=wanted, scan_budget=scan_budget)


def read_index(r: redis.Redis, index: str, record_key: Callable[[str], str], *, limit: int, cursor: str | None,
               wanted: Callable[[dict[str, str]], bool] = lambda _record: True, scan_budget: int = 2000
               ) -> tuple[list[dict[str, str]], str | None]:
    """One page of the records a time-ordered index (sorted set: id -> created_at) names, newest first from
    the cursor on, those `wanted` (a page reads at most scan_budget entries and may come back short, with a
    cursor to go on from); the next page's cursor, None at the end. Entries whose record (record_key(id))
    has expired are dropped from the index on the way. BadCursor for a cursor not made here."""
    top, after_id = parse_cursor(cursor) if cursor else (float("inf"), "")
    page: list[dict[str, str]] = []
    scanned = 0
    while True:
        batch = r.zrange(index, top, "-inf", byscore=True, desc=True, offset=0, num=limit + 16, withscores=True)
        # members with the cursor's own score come in reverse id order: skip up to and including it
        batch = [(m, sc) for m, sc in batch if not (sc == top and after_id and m >= after_id)]
        if not batch:
            return page, None
        pipe = r.pipeline(transaction=False)
        for member, _score in batch:
            pipe.hgetall(record_key(member))
        records = pipe.execute()
        gone = [member for (member, _score), record in zip(batch, records, strict=True) if not record]
        if gone:
            r.zrem(index, *gone)
        for (member, score), record in zip(batch, records, strict=True):
            if record and wanted(record):
                if len(page) == limit:  # one more exists: the page ends at the previous one
                    return page, job_cursor(top, after_id)
                page.append(record)
            top, after_id = score, member
            scanned += 1
            if scanned >= scan_budget:
                return page, job_cursor(top, after_id)


def job_history(r: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The job's status changes, oldest first: [{"status", "at"}]."""
    return [json.loads(item) for item in r.lrange(config.JOB_HISTORY_KEY.format(id=job_id), 0, -1)]


def queue_position(r: redis.Redis, record: dict[str, str]) -> int | None:
    """1 for the job that runs next; None when the entry is not (or no longer) in the queue.

    O(log N): counts slots and the cancelled entries among them, never scans the list. Cancelled
    entries still in the queue (dropped by the worker that takes them) do not count.
    """
    return redis_lua.run(r, "position", (job_key(record["id"]), *QUEUE_KEYS), record["id"])


def add_queue_positions(r: redis.Redis, records: list[dict[str, str]]) -> None:
    """Put each queued record's queue position under "queue_position", as get_job_with_position does,
    for a whole page of records in one round trip (a pipeline of the position script)."""
    queued = [record for record in records if record.get("status") == "queued"]
    if not queued:
        return
    results = redis_lua.run_many(r, "position", [((job_key(record["id"]), *QUEUE_KEYS), (record["id"],))
                                                 for record in queued])
    for record, position in zip(queued, results, strict=True):
        if isinstance(position, Exception):
            raise position
        record["queue_position"] = "" if position is None else str(position)


def job_params(record: dict[str, str]) -> dict[str, Any]:
    params = json.loads(record.get("params") or "{}")
    params["max_time"] = int(record.get("max_time") or 1200)
    params["notify_url"] = record.get("notify_url") or None
    return params


# --- the one function that changes a job's status ----------------------------------------------

def transition(
    r: redis.Redis,
    settings: config.Settings,
    job_id: str,
    new_status: str,
    fields: dict[str, Any] | None = None,
    *,
    worker_id: str = "",
    attempt: int = 0,
    now: float | None = None,
) -> tuple[bool, str]:
    """Move a job to new_status if that is allowed; return (changed, status now).

    A finished job never changes again, so a late result after a cancel is dropped. A worker names
    itself and the attempt its claim() returned (worker_id, attempt): the change is refused unless the
    job runs on that worker in that attempt. Without worker_id the change is the API's or the sweep's.
    A queued job that finishes (a cancel) leaves its entry in the queue for the worker that takes it to
    drop. Moving to a finished status queues the job's final webhook in the same script.
    """
    check_owner(worker_id, attempt)
    if worker_id and new_status == "running":
        raise ValueError("a worker starts a job with claim()")
    return run_transition(r, settings, job_id, new_status, fields, worker_id, attempt, "", now)[:2]


def claim(r: redis.Redis, settings: config.Settings, worker_id: str, entry: str,
          now: float | None = None) -> tuple[int, str]:
    """Start the job of a queue entry this worker took (the entry is in its processing list): (the attempt
    number, 'running'), the number every later change the worker makes to the job names. (0, status now)
    when refused: the job is no longer queued (cancelled, say), or the entry is no longer in the processing
    list (the sweep took the worker for dead and gave it back: the next taker runs it)."""
    job_id = json.loads(entry)["id"]
    changed, status, attempt = run_transition(r, settings, job_id, "running", {}, worker_id, 0, entry, now)
    return (attempt if changed else 0), status


def run_transition(r: redis.Redis, settings: config.Settings, job_id: str, new_status: str,
                   fields: dict[str, Any] | None, worker_id: str, attempt: int, entry: str,
                   now: float | None) -> tuple[bool, str, int]:
    """One call of the transition script: (changed, status now, the record's attempts when changed)."""
    fields = dict(fields or {})
    now = time.time() if now is None else now
    body = webhook_state.webhook_body(job_id, new_status, fields) if new_status in FINISHED_STATUSES else ""
    argv: list[Any] = [job_id, new_status, repr(now), settings.result_ttl_s, worker_id, attempt, entry, body]
    for key, value in fields.items():
        argv += [key, "" if value is None else str(value)]
    answer = redis_lua.run(r, "transition", (job_key(job_id), *QUEUE_KEYS, config.WEBHOOK_OUTBOX_KEY,
                                             processing_key(worker_id)), *argv, confirm=True)
    return bool(answer[0]), answer[1], int(answer[2]) if answer[0] else 0


def check_owner(worker_id: str, attempt: int) -> None:
    """A worker's change names its attempt too (what claim() returned); a change without a worker none."""
    if worker_id and attempt < 1:
        raise ValueError(f"worker {worker_id!r} names no attempt (claim() returns it)")


def cancel(r: redis.Redis, settings: config.Settings, job_id: str) -> str:
    """Cancel a job. Returns 'cancelled' (it was queued or waiting and is now cancelled), 'cancelling' (it is
    running; the worker stops it within seconds), 'finished:<status>' or 'missing'.

    O(log N) at any queue length: a queued job's entry stays in the queue as a tombstone that the
    worker taking it drops (its transition to running is refused), and stops counting in positions.
    """
    for _ in range(5):  # the job may start (or finish) between our read and our write; look again
        record = get_job(r, job_id)
        if record is None:
            return "missing"
        status = record["status"]
        if status in FINISHED_STATUSES:
            return f"finished:{status}"
        if status in ("queued", "waiting"):  # (waiting: a pipeline step whose inputs are not there yet)
            changed, _now = transition(r, settings, job_id, "cancelled", {"error": "cancelled by request"})
            if changed:
                return "cancelled"
            continue
        # running: ask the worker to stop
        if redis_lua.run(r, "flag_cancel", (job_key(job_id),), status, confirm=True):
            return "cancelling"
    record = get_job(r, job_id)
    return f"finished:{record['status']}" if record else "missing"


# --- the worker side of the protocol ----------------------------------------------------------

def heartbeat(r: redis.Redis, worker_id: str, ttl_s: int) -> None:
    """Announce the worker and keep its heartbeat key alive for ttl_s seconds."""
    pipe = r.pipeline(transaction=True)
    pipe.sadd(config.WORKERS_KEY, worker_id)
    pipe.set(heartbeat_key(worker_id), repr(time.time()), ex=max(1, int(ttl_s)))
    pipe.execute()


def retire_worker(r: redis.Redis, worker_id: str) -> None:
    """A worker leaving cleanly: its heartbeat and registration go (its processing list is empty)."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(heartbeat_key(worker_id))
    pipe.srem(config.WORKERS_KEY, worker_id)
    pipe.execute()


def take(r: redis.Redis, worker_id: str, timeout_s: float) -> str | None:
    """Block up to timeout_s for the next queue entry, moved into the worker's processing list."""
    return r.blmove(config.QUEUE_KEY, processing_key(worker_id), timeout_s, "RIGHT", "LEFT")


def ack(r: redis.Redis, worker_id: str, entry: str) -> None:
    r.lrem(processing_key(worker_id), 1, entry)


def return_entry(r: redis.Redis, worker_id: str, entry: str) -> None:
    """Give back an entry taken but not started: from the processing list to the head of the queue
    (dropped instead if its job was cancelled meanwhile). Nothing is pushed when the entry is no longer
    in the processing list: the sweep, taking this worker for dead, gave it back already."""
    job_id = json.loads(entry)["id"]
    redis_lua.run(r, "put_back", (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS), entry, "",
                  repr(time.time()), confirm=True)


def put_back(r: redis.Redis, worker_id: str, job_id: str, entry: str, attempt: int) -> bool:
    """Give a running job back to the queue (worker shutting down); it runs next, attempt not counted.
    False (the entry only dropped) when the job no longer runs on this worker in that attempt."""
    check_owner(worker_id, attempt)
    return bool(redis_lua.run(r, "put_back", (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS),
                              entry, worker_id, repr(time.time()), attempt, confirm=True))


def dead_workers(r: redis.Redis) -> list[str]:
    """Registered workers whose heartbeat key has expired."""
    workers = sorted(r.smembers(config.WORKERS_KEY) | nodestore.lease_holders(r))
    if not workers:
        return []
    pipe = r.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(heartbeat_key(worker))
    alive = pipe.execute()
    return [w for w, a in zip(workers, alive, strict=True) if not a]


def requeue_abandoned(r: redis.Redis, settings: config.Settings, me: str = "") -> dict[str, Any]:
    """Give the jobs of dead workers back to the queue; fail those out of attempts. The sweeping worker
    (me) is never one of them, nor is any worker whose heartbeat key exists when its list would move.

    Returns {"workers": [dead worker ids], "requeued": n, "failed": [job ids]}. Safe to run from
    several workers at once: every step is atomic and a second run finds nothing left to move.
    """
    summary: dict[str, Any] = {"workers": [], "requeued": 0, "failed": []}
    holders = nodestore.lease_holders(r)
    for worker in dead_workers(r):
        if worker == me:
            continue
        summary["workers"].append(worker)
        requeued, failed = requeue_processing(r, settings, worker, dead=True)
        summary["requeued"] += requeued
        summary["failed"] += failed
        # webhook deliveries the dead worker was sending go back to the outbox (same webhook-id)
        webhook_state.return_inflight(r, worker)
        if r.llen(processing_key(worker)) == 0 and worker not in holders:
            r.srem(config.WORKERS_KEY, worker)
    return summary


def requeue_processing(r: redis.Redis, settings: config.Settings, worker: str,
                       dead: bool = False) -> tuple[int, list[str]]:
    """Give every entry of one worker's processing list back to the queue (jobs out of attempts fail).

    For a dead worker (the sweep), or for a live worker itself when it runs no job: after a Redis error
    cut a job short, its entry is left in the processing list and nobody else would ever give it back.
    Either way none of that worker's attempts is live, so a job goes back when it is queued or runs on
    that worker (any attempt); an entry of a job another worker runs now is only dropped. With dead (the
    sweep), nothing moves while the worker's heartbeat exists (checked in the same step).
    Returns (entries requeued, ids of jobs failed after MAX_ATTEMPTS).
    """
    requeued, over = redis_lua.run(r, "requeue", (processing_key(worker), *QUEUE_KEYS, heartbeat_key(worker)),
                                   settings.max_attempts, config.JOB_KEY.format(id=""), repr(time.time()),
                                   worker, "dead" if dead else "", confirm=True)
    if int(requeued) < 0:
        return 0, []
    failed = []
    for entry in over:
        job_id = json.loads(entry)["id"]
        record = get_job(r, job_id) or {}
        message = (
            f"job failed after {record.get('attempts', settings.max_attempts)} attempts: the worker "
            "running it stopped responding each time (MAX_ATTEMPTS reached)"
        )
        transition(r, settings, job_id, "failed", {"error": message})
        ack(r, worker, entry)
        failed.append(job_id)
    return int(requeued), failed


def stop_requested(r: redis.Redis, job_id: str) -> bool:
    return r.hget(job_key(job_id), "cancel_requested") == "1"


def set_progress(r: redis.Redis, job_id: str, percent: int, *, worker_id: str = "", attempt: int = 0) -> None:
    """Record a running job's percentage (only while it runs; with worker_id, only while it runs there in
    that attempt, as for transition())."""
    check_owner(worker_id, attempt)
    redis_lua.run(r, "set_progress", (job_key(job_id),), str(int(percent)), job_id, worker_id, attempt)


def notify_changed(r: redis.Redis, job_id: str) -> None:
    """Tell /events listeners that a job record changed outside the scripts (e.g. a field set directly)."""
    redis_lua.run(r, "notify_changed", (job_key(job_id),), job_id)


def set_phase(r: redis.Redis, job_id: str, phase: str, now: float | None = None, *, worker_id: str = "",
              attempt: int = 0) -> None:
    """Record what a running job is doing now and since when (only while it runs: finished jobs never
    change; with worker_id, only while it runs there in that attempt, as for transition()). A new phase
    drops the percentage, which belonged to the phase it was measured in."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    check_owner(worker_id, attempt)
    redis_lua.run(r, "set_phase", (job_key(job_id),), phase, repr(time.time() if now is None else now), job_id,
                  worker_id, attempt)


# --- key names ---------------------------------------------------------------------

def job_key(job_id: str) -> str:
    return config.JOB_KEY.format(id=job_id)


def processing_key(worker_id: str) -> str:
    return config.PROCESSING_KEY.format(worker=worker_id)


def heartbeat_key(worker_id: str) -> str:
    return config.HEARTBEAT_KEY.format(worker=worker_id)


def queue_entry(job_id: str, job_type: str) -> str:
    return json.dumps({"id": job_id, "type": job_type}, separators=(",", ":"))


def is_job_id(value: str) -> bool:
    """A canonical lower-case UUID4 string, as submit() makes them."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return str(parsed) == value and parsed.version == 4
