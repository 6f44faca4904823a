"""The job store and the queue protocol in Redis, shared by the API and the worker.

Owns every Redis structure of c3-render (key names come from config.py):
- `job:<id>` hashes, one per job; every status change goes through `transition()`, a Lua script
  that refuses to change a finished job and queues the job's one final webhook atomically.
- `queue:jobs`, the one queue: submit LPUSHes, workers take from the right with BLMOVE into
  their own `processing:<worker>` list and acknowledge by removing the entry. Entries leave the
  queue only from the right: a cancel marks the job cancelled and leaves its entry (a tombstone)
  for the worker that takes it to drop, so cancel and /status never scan the list.
- queue slots, so that a queued job's position costs O(log N): every place in the queue has an
  integer slot. The left end is always slot -P (P = `queue:jobs:pushes`, LPUSHes ever), so the
  right end is -P + LLEN - 1; a submit lands on -P, a requeue (RPUSH) on right + 1. A job keeps its
  slot in `queue_slot`. An RPUSH can land on a slot an earlier entry left (taken from the right),
  so RPUSHes are noted in `queue:jobs:requeued` (id -> slot): a job is still in the queue iff its
  slot <= right end and no other entry was RPUSHed onto that slot since. Position = slots from the
  right end to the job's, minus the tombstones among them (`queue:jobs:cancelled`, id -> slot).
- worker heartbeats and `requeue_abandoned()`, which gives the jobs of dead workers back to the
  queue (or fails them after MAX_ATTEMPTS).
- node records and the MAX_NODES slot cap shared by all workers.
"""

from __future__ import annotations

import hashlib
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

# Lua helpers for queue slots, put in front of the scripts that use them (see the module docstring).
# Q = {queue, pushes, requeued, cancelled}: the queue list and its three slot keys.
_SLOTS_LUA = """
local function queue_right(Q)
  return -tonumber(redis.call('GET', Q[2]) or '0') + redis.call('LLEN', Q[1]) - 1
end
-- whether the job whose latest entry went onto `slot` is still in the queue
local function in_queue(Q, id, slot, right)
  if slot == nil or slot > right then return false end
  local score = redis.call('ZSCORE', Q[3], id)
  if score then return tonumber(score) == slot end
  return redis.call('ZCOUNT', Q[3], slot, slot) == 0
end
-- RPUSH a job's entry (it runs next) and give it the slot right + 1
local function push_front(Q, job_key, id, entry)
  local slot = queue_right(Q) + 1
  redis.call('ZREMRANGEBYSCORE', Q[3], slot, slot)
  redis.call('ZREMRANGEBYSCORE', Q[4], slot, slot)
  redis.call('ZADD', Q[3], slot, id)
  redis.call('HSET', job_key, 'queue_slot', slot)
  redis.call('RPUSH', Q[1], entry)
end
-- forget slot notes of entries already taken from the right (they can only be stale now)
local function trim_slots(Q)
  local beyond = '(' .. string.format('%d', queue_right(Q))
  redis.call('ZREMRANGEBYSCORE', Q[3], beyond, '+inf')
  redis.call('ZREMRANGEBYSCORE', Q[4], beyond, '+inf')
end
"""

# KEYS: job, queue, pushes, requeued, cancelled, outbox.  ARGV: id, new status, now, result ttl,
# required worker ('' = any), (unused), webhook body ('' = none), then field/value pairs.
# Returns {1, new status} when changed, {0, current status or 'missing'} when refused. A queued job
# that finishes (a cancel) leaves its entry in the queue as a tombstone, noted in the cancelled set.
_TRANSITION_LUA = _SLOTS_LUA + """
local Q = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
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
local finishing = new == 'success' or new == 'failed' or new == 'cancelled'
if cur == 'queued' and finishing then
  -- (a record from before queue slots has none: its entry stays too, counted by positions until taken)
  local slot = tonumber(redis.call('HGET', KEYS[1], 'queue_slot') or '')
  if slot ~= nil and in_queue(Q, ARGV[1], slot, queue_right(Q)) then
    redis.call('ZADD', KEYS[5], slot, ARGV[1])
  end
end
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'status', new)
if new == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  trim_slots(Q)
end
if finishing then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('HDEL', KEYS[1], 'cancel_requested', 'progress')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local url = redis.call('HGET', KEYS[1], 'notify_url')
  if url and url ~= '' and ARGV[7] ~= '' then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0)
    redis.call('LPUSH', KEYS[6], cjson.encode({job_id = ARGV[1], url = url, body = ARGV[7], attempt = 0}))
  end
end
return {1, new}
"""

# KEYS: processing list, queue, pushes, requeued, cancelled.  ARGV: max attempts, job key prefix.
# Gives every entry of a dead worker's processing list back to the queue (as the next to run),
# except finished jobs (dropped) and jobs that used up their attempts (returned to the caller,
# which fails them through transition()).
_REQUEUE_LUA = _SLOTS_LUA + """
local Q = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
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
      push_front(Q, key, id, entry)
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

# KEYS: job, queue, pushes, idempotency key.  ARGV: idempotency record ('' = no key), its ttl, then
# id, type, params, created_at, complete_by, max_time, notify_url. The script writes the record (so
# the request sends 9 values instead of 22 field/value pairs) and the entry. Returns '' when queued,
# else the idempotency record already stored (nothing is written then).
_SUBMIT_LUA = """
if ARGV[1] ~= '' then
  local seen = redis.call('GET', KEYS[4])
  if seen then return seen end
end
local id, job_type, notify_url = ARGV[3], ARGV[4], ARGV[9]
local entry = '{"id":"' .. id .. '","type":"' .. job_type .. '"}'
redis.call('HSET', KEYS[1], 'id', id, 'type', job_type, 'status', 'queued', 'params', ARGV[5],
  'created_at', ARGV[6], 'complete_by', ARGV[7], 'max_time', ARGV[8], 'attempts', '0',
  'notify_url', notify_url, 'webhook_status', notify_url ~= '' and 'waiting' or 'none',
  'queue_entry', entry, 'queue_slot', -redis.call('INCR', KEYS[3]))
redis.call('LPUSH', KEYS[2], entry)
if ARGV[1] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
return ''
"""

# KEYS: job, queue, pushes, requeued, cancelled.  ARGV: id.
# 1 for the job that runs next; nil when the job is not queued or its entry is no longer in the queue.
_POSITION_LUA = _SLOTS_LUA + """
local Q = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
local record = redis.call('HMGET', KEYS[1], 'status', 'queue_slot', 'queue_entry')
if record[1] ~= 'queued' then return nil end
local slot = tonumber(record[2] or '')
if slot == nil then
  -- a record from before queue slots: find it the old (O(N)) way
  local index = redis.call('LPOS', KEYS[2], record[3] or '', 'RANK', -1)
  if not index then return nil end
  return redis.call('LLEN', KEYS[2]) - index
end
local right = queue_right(Q)
if not in_queue(Q, ARGV[1], slot, right) then return nil end
return right - slot + 1 - redis.call('ZCOUNT', KEYS[5], slot + 1, right)
"""

# KEYS: job, processing list, queue, pushes, requeued, cancelled.  ARGV: entry, worker ('' = any).
# Moves an entry from a worker's processing list back to the front of the queue if its job is queued
# (taken, not started) or running on that worker (put back: the attempt is not counted); otherwise
# (cancelled meanwhile, or finished) the entry is only dropped. 1 when the entry went back.
_PUT_BACK_LUA = _SLOTS_LUA + """
local Q = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local status = redis.call('HGET', KEYS[1], 'status')
local back = 0
if status == 'queued' and ARGV[2] == '' then
  back = 1
elseif status == 'running' and ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'worker', 'progress')
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  back = 1
end
redis.call('LREM', KEYS[2], 1, ARGV[1])
if back == 1 then push_front(Q, KEYS[1], cjson.decode(ARGV[1])['id'], ARGV[1]) end
return back
"""

FILE_SECRET_KEY = "config:file_url_secret"  # noqa: S105 (a key name, not a secret)
QUEUE_KEYS = (config.QUEUE_KEY, config.QUEUE_PUSHES_KEY, config.QUEUE_REQUEUED_KEY, config.QUEUE_CANCELLED_KEY)
_SHA1: dict[str, str] = {}


def run_script(r: redis.Redis, script: str, keys: list[str] | tuple[str, ...], *args: Any) -> Any:
    """EVALSHA a script (one round trip), loading it on the first NOSCRIPT."""
    sha = _SHA1.get(script)
    if sha is None:
        sha = _SHA1[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 (Redis' script id)
    try:
        return r.evalsha(sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return r.eval(script, len(keys), *keys, *args)


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
    """Write the job record and its queue entry in one script (one round trip); return (job id, created).

    With idempotency_key (already scoped to the client), a repeat of the same body returns the first
    job's id and queues nothing (created False); a different body raises IdempotencyConflict.
    """
    now = time.time() if now is None else now
    job_id = str(uuid.uuid4())
    stored = {k: v for k, v in params.items() if k not in ("notify_url", "max_time", "complete_in")}
    seen = json.dumps({"job_id": job_id, "body_hash": body_hash}) if idempotency_key else ""
    # the record's fields are set by the script (see _SUBMIT_LUA); queue_entry() gives the same entry
    first = run_script(r, _SUBMIT_LUA, (job_key(job_id), config.QUEUE_KEY, config.QUEUE_PUSHES_KEY,
                                        idempotency_key or config.QUEUE_PUSHES_KEY),
                       seen, idempotency_ttl_s, job_id, job_type, json.dumps(stored), repr(now),
                       repr(now + params["complete_in"]), str(params["max_time"]), params.get("notify_url") or "")
    if not first:
        return job_id, True
    first = json.loads(first)
    if first["body_hash"] != body_hash:
        raise IdempotencyConflict(first["job_id"])
    return first["job_id"], False


def get_job(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    record = r.hgetall(job_key(job_id))
    return record or None


def queue_position(r: redis.Redis, record: dict[str, str]) -> int | None:
    """1 for the job that runs next; None when the entry is not (or no longer) in the queue.

    O(log N): counts slots and the cancelled entries among them, never scans the list. Cancelled
    entries still in the queue (dropped by the worker that takes them) do not count.
    """
    return run_script(r, _POSITION_LUA, (job_key(record["id"]), *QUEUE_KEYS), record["id"])


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
    now: float | None = None,
) -> tuple[bool, str]:
    """Move a job to new_status if that is allowed; return (changed, status now).

    A finished job never changes again, so a late result after a cancel is dropped. With worker_id,
    a running job only changes if that worker holds it. A queued job that finishes (a cancel) leaves
    its entry in the queue for the worker that takes it to drop. Moving to a finished status queues
    the job's final webhook in the same script.
    """
    fields = dict(fields or {})
    now = time.time() if now is None else now
    body = webhook_body(job_id, new_status, fields) if new_status in FINISHED_STATUSES else ""
    argv: list[Any] = [job_id, new_status, repr(now), settings.result_ttl_s, worker_id, "", body]
    for key, value in fields.items():
        argv += [key, "" if value is None else str(value)]
    changed, status = run_script(r, _TRANSITION_LUA, (job_key(job_id), *QUEUE_KEYS, config.WEBHOOK_OUTBOX_KEY),
                                 *argv)
    return bool(changed), status


def cancel(r: redis.Redis, settings: config.Settings, job_id: str) -> str:
    """Cancel a job. Returns 'cancelled' (it was queued and is now cancelled), 'cancelling' (it is
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
        if status == "queued":
            changed, _now = transition(r, settings, job_id, "cancelled", {"error": "cancelled by request"})
            if changed:
                return "cancelled"
            continue
        # running: ask the worker to stop
        flagged = r.eval(
            "if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then "
            "redis.call('HSET', KEYS[1], 'cancel_requested', '1') return 1 end return 0",
            1, job_key(job_id), status,
        )
        if flagged:
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
    (dropped instead if its job was cancelled meanwhile)."""
    job_id = json.loads(entry)["id"]
    run_script(r, _PUT_BACK_LUA, (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS), entry, "")


def put_back(r: redis.Redis, worker_id: str, job_id: str, entry: str) -> bool:
    """Give a running job back to the queue (worker shutting down); it runs next, attempt not counted."""
    return bool(run_script(r, _PUT_BACK_LUA, (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS),
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
        inflight = config.WEBHOOK_INFLIGHT_KEY.format(worker=worker)
        while r.lmove(inflight, config.WEBHOOK_OUTBOX_KEY, "RIGHT", "LEFT"):
            pass
        if r.llen(processing_key(worker)) == 0 and not r.exists(node_key(worker)):
            r.srem(config.WORKERS_KEY, worker)
    return summary


def requeue_processing(r: redis.Redis, settings: config.Settings, worker: str) -> tuple[int, list[str]]:
    """Give every entry of one worker's processing list back to the queue (jobs out of attempts fail).

    For a dead worker (the sweep), or for a live worker itself when it runs no job: after a Redis error
    cut a job short, its entry is left in the processing list and nobody else would ever give it back.
    Returns (entries requeued, ids of jobs failed after MAX_ATTEMPTS).
    """
    requeued, over = run_script(r, _REQUEUE_LUA, (processing_key(worker), *QUEUE_KEYS),
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


def record_webhook(r: redis.Redis, job_id: str, status: str, attempts: int, error: str = "") -> None:
    """Keep a webhook's delivery state on the job record, if the record still exists."""
    r.eval(
        "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'webhook_status', ARGV[1], "
        "'webhook_attempts', ARGV[2], 'webhook_error', ARGV[3], 'webhook_updated_at', ARGV[4]) end return 0",
        1, job_key(job_id), status, str(attempts), error, repr(time.time()),
    )


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
