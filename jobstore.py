"""The job store and the queue protocol in Redis, shared by the API and the worker.

Owns every Redis structure of c3-render (key names come from config.py):
- `job:<id>` hashes, one per job; every status change goes through `transition()`, a Lua script
  that refuses to change a finished job and queues the job's one final webhook atomically.
- `queue:jobs`, the one queue: submit LPUSHes, workers take from the right with BLMOVE into
  their own `processing:<worker>` list and acknowledge by removing the entry.
- worker heartbeats and `requeue_abandoned()`, which gives the jobs of dead workers back to the
  queue (or fails them after MAX_ATTEMPTS).
- node records and the MAX_NODES slot cap shared by all workers.
- webhook delivery state: `settle_webhook()` records an attempt (status fields and the bounded
  `webhook_history` JSON list on the job hash) and takes the entry off the worker's
  `webhooks:inflight:<worker>` list in one step; `resend_webhook()` queues a final webhook again;
  `return_inflight()` gives a worker's in-flight deliveries back to the outbox.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any

import redis

import config
from jobspec import FINISHED_STATUSES

# Which status may follow which. Finished statuses have no successors: a finished job never changes.
ALLOWED = {
    "queued": ("running", "cancelled", "failed"),
    "running": ("success", "failed", "cancelled", "queued"),
}

# KEYS: job, queue, outbox.  ARGV: id, new status, now, result ttl, required worker ('' = any),
# entry to take off the queue ('' = none), webhook body ('' = none), then field/value pairs.
# Returns {1, new status} when changed, {0, current status or 'missing'} when refused.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 'missing'} end
local new = ARGV[2]
local allowed = {
  queued = {running = true, cancelled = true, failed = true},
  running = {success = true, failed = true, cancelled = true, queued = true},
}
if not allowed[cur] or not allowed[cur][new] then return {0, cur} end
if ARGV[5] ~= '' and cur == 'running' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return {0, cur}
end
if ARGV[6] ~= '' then
  if redis.call('LREM', KEYS[2], 1, ARGV[6]) == 0 then return {0, cur} end
end
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'status', new)
if new == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
if new == 'success' or new == 'failed' or new == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('HDEL', KEYS[1], 'cancel_requested', 'progress')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local url = redis.call('HGET', KEYS[1], 'notify_url')
  if url and url ~= '' and ARGV[7] ~= '' then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0)
    redis.call('LPUSH', KEYS[3], cjson.encode({job_id = ARGV[1], url = url, body = ARGV[7], attempt = 0}))
  end
end
return {1, new}
"""

# KEYS: processing list, queue.  ARGV: max attempts, job key prefix.
# Gives every entry of a dead worker's processing list back to the queue (as the next to run),
# except finished jobs (dropped) and jobs that used up their attempts (returned to the caller,
# which fails them through transition()).
_REQUEUE_LUA = """
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local over = {}
local requeued = 0
for i = #entries, 1, -1 do
  local entry = entries[i]
  local id = cjson.decode(entry)['id']
  local key = ARGV[2] .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'running' or status == 'queued' then
    local attempts = tonumber(redis.call('HGET', key, 'attempts') or '0')
    if attempts >= tonumber(ARGV[1]) then
      table.insert(over, entry)
    else
      redis.call('HSET', key, 'status', 'queued')
      redis.call('HDEL', key, 'worker', 'progress')
      redis.call('RPUSH', KEYS[2], entry)
      redis.call('LREM', KEYS[1], 1, entry)
      requeued = requeued + 1
    end
  else
    redis.call('LREM', KEYS[1], 1, entry)
  end
end
return {requeued, over}
"""

# KEYS: slots set. ARGV: worker, max nodes. 1 when the worker holds a slot (now or already).
_ACQUIRE_SLOT_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

FILE_SECRET_KEY = "config:file_url_secret"  # noqa: S105 (a key name, not a secret)


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client with timeouts, so that a dead Redis gives an error instead of a hang."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        health_check_interval=30,
    )


def job_key(job_id: str) -> str:
    return config.JOB_KEY.format(id=job_id)


def processing_key(worker_id: str) -> str:
    return config.PROCESSING_KEY.format(worker=worker_id)


def heartbeat_key(worker_id: str) -> str:
    return config.HEARTBEAT_KEY.format(worker=worker_id)


def node_key(worker_id: str) -> str:
    return config.NODE_KEY.format(worker=worker_id)


def queue_entry(job_id: str, job_type: str) -> str:
    return json.dumps({"id": job_id, "type": job_type}, separators=(",", ":"))


def is_job_id(value: str) -> bool:
    """A canonical lower-case UUID4 string, as submit() makes them."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return str(parsed) == value and parsed.version == 4


# --- submission and reading (API side) --------------------------------------------------------

class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


def submit(
    r: redis.Redis,
    job_type: str,
    params: dict[str, Any],
    now: float | None = None,
    *,
    idempotency_key: str = "",
    body_hash: str = "",
    idempotency_ttl_s: int = 24 * 3600,
) -> tuple[str, bool]:
    """Write the job record and its queue entry in one MULTI/EXEC; return (job id, created).

    With idempotency_key (already scoped to the client), a repeat of the same body returns the first
    job's id and queues nothing (created False); a different body raises IdempotencyConflict.
    """
    now = time.time() if now is None else now
    job_id = str(uuid.uuid4())
    stored = {k: v for k, v in params.items() if k not in ("notify_url", "max_time", "complete_in")}
    record = {
        "id": job_id,
        "type": job_type,
        "status": "queued",
        "params": json.dumps(stored),
        "created_at": repr(now),
        "complete_by": repr(now + params["complete_in"]),
        "max_time": str(params["max_time"]),
        "attempts": "0",
        "notify_url": params.get("notify_url") or "",
        "webhook_status": "waiting" if params.get("notify_url") else "none",
        "queue_entry": queue_entry(job_id, job_type),
    }
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                if idempotency_key:
                    pipe.watch(idempotency_key)
                    seen = pipe.get(idempotency_key)
                    if seen:
                        first = json.loads(seen)
                        if first["body_hash"] != body_hash:
                            raise IdempotencyConflict(first["job_id"])
                        return first["job_id"], False
                pipe.multi()
                pipe.hset(job_key(job_id), mapping=record)
                pipe.lpush(config.QUEUE_KEY, record["queue_entry"])
                if idempotency_key:
                    pipe.set(idempotency_key, json.dumps({"job_id": job_id, "body_hash": body_hash}),
                             ex=idempotency_ttl_s)
                pipe.execute()
                return job_id, True
            except redis.WatchError:
                continue


def get_job(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    record = r.hgetall(job_key(job_id))
    return record or None


def queue_position(r: redis.Redis, record: dict[str, str]) -> int | None:
    """1 for the job that runs next; None when the entry is not (or no longer) in the queue."""
    pipe = r.pipeline(transaction=True)
    pipe.lpos(config.QUEUE_KEY, record["queue_entry"], rank=-1)
    pipe.llen(config.QUEUE_KEY)
    index, length = pipe.execute()
    return None if index is None else length - index


def job_params(record: dict[str, str]) -> dict[str, Any]:
    params = json.loads(record.get("params") or "{}")
    params["max_time"] = int(record.get("max_time") or 1200)
    params["notify_url"] = record.get("notify_url") or None
    return params


# --- the one function that changes a job's status ----------------------------------------------

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


def transition(
    r: redis.Redis,
    settings: config.Settings,
    job_id: str,
    new_status: str,
    fields: dict[str, Any] | None = None,
    *,
    worker_id: str = "",
    dequeue_entry: str = "",
    now: float | None = None,
) -> tuple[bool, str]:
    """Move a job to new_status if that is allowed; return (changed, status now).

    A finished job never changes again, so a late result after a cancel is dropped. With worker_id,
    a running job only changes if that worker holds it. With dequeue_entry, the change happens only
    if that entry could be taken off the queue (a cancel racing a worker's take). Moving to a finished
    status queues the job's final webhook in the same script.
    """
    fields = dict(fields or {})
    now = time.time() if now is None else now
    body = webhook_body(job_id, new_status, fields) if new_status in FINISHED_STATUSES else ""
    argv: list[Any] = [job_id, new_status, repr(now), settings.result_ttl_s, worker_id, dequeue_entry, body]
    for key, value in fields.items():
        argv += [key, "" if value is None else str(value)]
    changed, status = r.eval(
        _TRANSITION_LUA, 3, job_key(job_id), config.QUEUE_KEY, config.WEBHOOK_OUTBOX_KEY, *argv
    )
    return bool(changed), status


def cancel(r: redis.Redis, settings: config.Settings, job_id: str) -> str:
    """Cancel a job. Returns 'cancelled' (it was queued and is now cancelled), 'cancelling' (it is
    running; the worker stops it within seconds), 'finished:<status>' or 'missing'."""
    for _ in range(5):  # a worker may take the job between our read and our write; look again
        record = get_job(r, job_id)
        if record is None:
            return "missing"
        status = record["status"]
        if status in FINISHED_STATUSES:
            return f"finished:{status}"
        if status == "queued":
            changed, _now = transition(r, settings, job_id, "cancelled", {"error": "cancelled by request"},
                                       dequeue_entry=record["queue_entry"])
            if changed:
                return "cancelled"
        # running, or taken by a worker that has not started it yet: ask the worker to stop
        flagged = r.eval(
            "if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then "
            "redis.call('HSET', KEYS[1], 'cancel_requested', '1') return 1 end return 0",
            1, job_key(job_id), status,
        )
        if flagged and (status == "running" or queue_position(r, record) is None):
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
    """Give back an entry taken but not started: from the processing list to the head of the queue."""
    pipe = r.pipeline(transaction=True)
    pipe.lrem(processing_key(worker_id), 1, entry)
    pipe.rpush(config.QUEUE_KEY, entry)
    pipe.execute()


def put_back(r: redis.Redis, worker_id: str, job_id: str, entry: str) -> bool:
    """Give a running job back to the queue (worker shutting down); it runs next, attempt not counted."""
    script = """
    if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2]
    then redis.call('LREM', KEYS[2], 1, ARGV[1]) return 0 end
    redis.call('HSET', KEYS[1], 'status', 'queued')
    redis.call('HDEL', KEYS[1], 'worker', 'progress')
    redis.call('HINCRBY', KEYS[1], 'attempts', -1)
    redis.call('LREM', KEYS[2], 1, ARGV[1])
    redis.call('RPUSH', KEYS[3], ARGV[1])
    return 1
    """
    return bool(r.eval(script, 3, job_key(job_id), processing_key(worker_id), config.QUEUE_KEY,
                       entry, worker_id))


def dead_workers(r: redis.Redis) -> list[str]:
    """Registered workers whose heartbeat key has expired."""
    workers = sorted(r.smembers(config.WORKERS_KEY) | r.smembers(config.NODE_SLOTS_KEY))
    if not workers:
        return []
    pipe = r.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(heartbeat_key(worker))
    alive = pipe.execute()
    return [w for w, a in zip(workers, alive, strict=True) if not a]


def requeue_abandoned(r: redis.Redis, settings: config.Settings) -> dict[str, Any]:
    """Give the jobs of dead workers back to the queue; fail those out of attempts.

    Returns {"workers": [dead worker ids], "requeued": n, "failed": [job ids]}. Safe to run from
    several workers at once: every step is atomic and a second run finds nothing left to move.
    """
    summary: dict[str, Any] = {"workers": [], "requeued": 0, "failed": []}
    for worker in dead_workers(r):
        summary["workers"].append(worker)
        requeued, failed = requeue_processing(r, settings, worker)
        summary["requeued"] += requeued
        summary["failed"] += failed
        # webhook deliveries the dead worker was sending go back to the outbox (same webhook-id)
        return_inflight(r, worker)
        if r.llen(processing_key(worker)) == 0 and not r.exists(node_key(worker)):
            r.srem(config.WORKERS_KEY, worker)
    return summary


def requeue_processing(r: redis.Redis, settings: config.Settings, worker: str) -> tuple[int, list[str]]:
    """Give every entry of one worker's processing list back to the queue (jobs out of attempts fail).

    For a dead worker (the sweep), or for a live worker itself when it runs no job: after a Redis error
    cut a job short, its entry is left in the processing list and nobody else would ever give it back.
    Returns (entries requeued, ids of jobs failed after MAX_ATTEMPTS).
    """
    requeued, over = r.eval(_REQUEUE_LUA, 2, processing_key(worker), config.QUEUE_KEY,
                            settings.max_attempts, config.JOB_KEY.format(id=""))
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


def set_progress(r: redis.Redis, job_id: str, percent: int) -> None:
    r.eval(
        "if redis.call('HGET', KEYS[1], 'status') == 'running' then "
        "redis.call('HSET', KEYS[1], 'progress', ARGV[1]) end return 0",
        1, job_key(job_id), str(int(percent)),
    )


# Appends one event to the job's webhook_history (a JSON list, oldest dropped past the cap).
# Expects: key = the job key, event = a Lua table, cap = the number kept.
_HISTORY_LUA = """
local function add_history(key, event, cap)
  local raw = redis.call('HGET', key, 'webhook_history')
  local history = {}
  if raw and raw ~= '' then history = cjson.decode(raw) end
  table.insert(history, event)
  while #history > cap do table.remove(history, 1) end
  redis.call('HSET', key, 'webhook_history', cjson.encode(history))
end
"""

# KEYS: in-flight list, job, retry set.  ARGV: in-flight entry, outcome, attempt number, error, now,
# retry entry ('' = none), retry time, history cap. Does nothing (returns 0) when the entry is no
# longer in the in-flight list: it was given back to the outbox (shutdown, sweep) or settled already.
_SETTLE_WEBHOOK_LUA = _HISTORY_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'webhook_status', ARGV[2], 'webhook_attempts', ARGV[3], 'webhook_error', ARGV[4],
             'webhook_updated_at', ARGV[5])
  local event = {at = tonumber(ARGV[5]), attempt = tonumber(ARGV[3]), outcome = ARGV[2]}
  if ARGV[4] ~= '' then event['error'] = ARGV[4] end
  add_history(KEYS[2], event, tonumber(ARGV[8]))
end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6]) end
return 1
"""

# KEYS: job, outbox.  ARGV: job id, webhook body, now, history cap.
_RESEND_WEBHOOK_LUA = _HISTORY_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'success' and status ~= 'failed' and status ~= 'cancelled' then return 'unfinished' end
local url = redis.call('HGET', KEYS[1], 'notify_url')
if not url or url == '' then return 'no_url' end
local hook = redis.call('HGET', KEYS[1], 'webhook_status')
if hook ~= 'failed' and hook ~= 'delivered' then return 'busy' end
redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0, 'webhook_error', '',
           'webhook_updated_at', ARGV[3])
add_history(KEYS[1], {at = tonumber(ARGV[3]), attempt = 0, outcome = 'resend requested'}, tonumber(ARGV[4]))
redis.call('LPUSH', KEYS[2], cjson.encode({job_id = ARGV[1], url = url, body = ARGV[2], attempt = 0}))
return 'queued'
"""

# KEYS: in-flight list, outbox. Moves every entry back (to the end taken next), as they were.
_RETURN_INFLIGHT_LUA = """
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"""


def webhook_inflight_key(worker_id: str) -> str:
    return config.WEBHOOK_INFLIGHT_KEY.format(worker=worker_id)


def settle_webhook(r: redis.Redis, worker_id: str, raw_entry: str, job_id: str, outcome: str, attempt: int,
                   error: str = "", retry_entry: str = "", retry_at: float = 0.0) -> bool:
    """Record one attempt's outcome (status fields and a webhook_history event) and take the entry off
    the worker's in-flight list, scheduling retry_entry at retry_at if given; all in one step. False
    (nothing changed) when the entry was given back to the outbox meanwhile, or settled already."""
    return bool(r.eval(_SETTLE_WEBHOOK_LUA, 3, webhook_inflight_key(worker_id), job_key(job_id),
                       config.WEBHOOK_RETRY_KEY, raw_entry, outcome, str(attempt), error[:500],
                       repr(time.time()), retry_entry, repr(retry_at), config.WEBHOOK_HISTORY_MAX))


def resend_webhook(r: redis.Redis, job_id: str) -> str:
    """Queue a finished job's final webhook again (same body and webhook-id) after it was delivered
    or failed for good. Returns 'queued', 'missing', 'unfinished', 'no_url' or 'busy' (being sent)."""
    record = get_job(r, job_id)
    if record is None:
        return "missing"
    body = webhook_body(job_id, record["status"], record) if record["status"] in FINISHED_STATUSES else ""
    return str(r.eval(_RESEND_WEBHOOK_LUA, 2, job_key(job_id), config.WEBHOOK_OUTBOX_KEY, job_id, body,
                      repr(time.time()), config.WEBHOOK_HISTORY_MAX))


def return_inflight(r: redis.Redis, worker_id: str) -> int:
    """Give a worker's in-flight webhook deliveries back to the outbox unchanged (same webhook-id and
    attempt count), to be taken next. Returns how many."""
    return int(r.eval(_RETURN_INFLIGHT_LUA, 2, webhook_inflight_key(worker_id), config.WEBHOOK_OUTBOX_KEY))


def webhook_history(record: dict[str, str]) -> list[dict[str, Any]]:
    """The job's delivery events, oldest first: {"at": unix seconds, "attempt": n, "outcome": ...,
    "error": ... (when there was one)}; outcome is delivered, retrying, failed or resend requested."""
    try:
        history = json.loads(record.get("webhook_history") or "[]")
    except ValueError:
        return []
    return history if isinstance(history, list) else []


# --- GPU nodes held by workers, and the MAX_NODES cap --------------------------------------------

def acquire_node_slot(r: redis.Redis, worker_id: str, max_nodes: int) -> bool:
    """Take one of the MAX_NODES slots for this worker (atomic); True if it holds one."""
    return bool(r.eval(_ACQUIRE_SLOT_LUA, 1, config.NODE_SLOTS_KEY, worker_id, max_nodes))


def record_node(r: redis.Redis, worker_id: str, node: dict[str, Any]) -> None:
    r.hset(node_key(worker_id), mapping={k: str(v) for k, v in node.items()})


def get_node(r: redis.Redis, worker_id: str) -> dict[str, str] | None:
    return r.hgetall(node_key(worker_id)) or None


def release_node(r: redis.Redis, worker_id: str) -> None:
    """The worker's node is stopped (or never launched): forget it and free its slot."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(node_key(worker_id))
    pipe.srem(config.NODE_SLOTS_KEY, worker_id)
    pipe.execute()


def claim_dead_node(r: redis.Redis, worker_id: str) -> dict[str, str] | None:
    """For the recovery sweep: the node record of a dead worker, claimed by one sweeper at a time."""
    if r.exists(heartbeat_key(worker_id)):
        return None
    if not r.set(f"sweep:{worker_id}", "1", nx=True, ex=120):
        return None
    return get_node(r, worker_id) or {}


def file_url_secret(r: redis.Redis, configured: str) -> bytes:
    """The secret that signs local /files URLs: FILE_URL_SECRET, or one made once and kept in Redis."""
    if configured:
        return configured.encode()
    r.set(FILE_SECRET_KEY, secrets.token_hex(32), nx=True)
    return r.get(FILE_SECRET_KEY).encode()
