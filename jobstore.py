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
- node records (one per worker and workload type), the MAX_NODES slot cap shared by all workers,
  the launch intents and the registry of the nodes this service launched (leak-proof launches).
- the GET /jobs indexes (time-ordered sorted sets), each job's status history, the /metrics counters
  and the pub/sub wake-ups of /events: all kept by the same scripts that change a job.
- webhook delivery state: `settle_webhook()` records an attempt (status fields and the bounded
  `webhook_history` JSON list on the job hash) and takes the entry off the worker's
  `webhooks:inflight:<worker>` list in one step; `resend_webhook()` queues a final webhook again;
  `return_inflight()` gives a worker's in-flight deliveries back to the outbox.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import uuid
from string import Template
from typing import Any

import redis

import config
from jobspec import COMMON_FIELDS, FINISHED_STATUSES, JOBS_CURSOR_PATTERN, PHASES

# Which status may follow which. Finished statuses have no successors: a finished job never changes.
ALLOWED = {
    "queued": ("running", "cancelled", "failed"),
    "running": ("success", "failed", "cancelled", "queued"),
}

# Duration histogram buckets of c3_render_job_duration_seconds (seconds from start to finish)
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# Index entries older than this (plus RESULT_TTL) belong to records that have expired: a job finishes
# by its complete_by (at most complete_in after submission, plus a last run of max_time) and its record
# lives RESULT_TTL after that.
INDEX_HORIZON_S = int(sum(f.maximum or 0 for f in COMMON_FIELDS if f.name in ("complete_in", "max_time")))

# Key and channel names the Lua scripts below use, from config.py (one substitution map for all of them).
_LUA_NAMES = {
    "by_status": config.JOBS_BY_STATUS_KEY.format(status=""),
    "by_type": config.JOBS_BY_TYPE_KEY.format(type=""),
    "index": config.JOBS_INDEX_KEY,
    "history_prefix": config.JOB_HISTORY_KEY.split("{id}")[0],
    "history_suffix": config.JOB_HISTORY_KEY.split("{id}")[1],
    "jobs_total": config.JOBS_TOTAL_KEY,
    "duration": config.JOB_DURATION_KEY.format(type=""),
    "recent": config.FINISHED_RECENT_KEY,
    "queue_channel": config.QUEUE_EVENTS_CHANNEL,
    "job_channel": config.JOB_EVENTS_CHANNEL.format(id=""),
    "buckets": ", ".join(str(b) for b in DURATION_BUCKETS),
    "horizon": INDEX_HORIZON_S,
}

# Lua functions shared by the scripts that change a job record: every change bumps the record's
# `events` number and is published for /events listeners; a status change also moves the job between
# the status indexes of GET /jobs and lands in its history. Key names come from config.py.
_CHANGED_LUA = Template("""
local function job_changed(job_key, job_id, old, new, now)
  if old ~= new then
    local created = redis.call('HGET', job_key, 'created_at') or now
    redis.call('ZREM', '${by_status}' .. old, job_id)
    redis.call('ZADD', '${by_status}' .. new, created, job_id)
    local history = '${history_prefix}' .. job_id .. '${history_suffix}'
    redis.call('RPUSH', history, cjson.encode({status = new, at = tonumber(now)}))
    if old == 'queued' or new == 'queued' then redis.call('PUBLISH', '${queue_channel}', job_id) end
  end
  redis.call('PUBLISH', '${job_channel}' .. job_id, redis.call('HINCRBY', job_key, 'events', 1))
end
""").substitute(_LUA_NAMES)

# On a finished job: count it for /metrics, keep it among the recent finishes, expire its history with
# it and trim the indexes of GET /jobs past their retention.
_FINISHED_LUA = Template("""
local function job_finished(job_key, job_id, new, now, ttl)
  local job_type = redis.call('HGET', job_key, 'type') or 'unknown'
  redis.call('HINCRBY', '${jobs_total}', job_type .. '|' .. new, 1)
  local started = redis.call('HGET', job_key, 'started_at')
  if started then
    local seconds = tonumber(now) - tonumber(started)
    local bound = '+Inf'
    for _, b in ipairs({${buckets}}) do
      if seconds <= b then bound = tostring(b) break end
    end
    local key = '${duration}' .. job_type
    redis.call('HINCRBY', key, bound, 1)
    redis.call('HINCRBY', key, 'count', 1)
    redis.call('HINCRBYFLOAT', key, 'sum', seconds)
  end
  redis.call('ZADD', '${recent}', now, job_id)
  redis.call('ZREMRANGEBYSCORE', '${recent}', '-inf', tonumber(now) - 86400)
  redis.call('EXPIRE', '${history_prefix}' .. job_id .. '${history_suffix}', ttl)
  local horizon = tonumber(now) - tonumber(ttl) - ${horizon}
  for _, key in ipairs({'${index}', '${by_type}' .. job_type, '${by_status}' .. new}) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  end
end
""").substitute(_LUA_NAMES)

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
_TRANSITION_LUA = _CHANGED_LUA + _FINISHED_LUA + _SLOTS_LUA + """
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
job_changed(KEYS[1], ARGV[1], cur, new, ARGV[3])
if new == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  trim_slots(Q)
end
if finishing then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('HDEL', KEYS[1], 'cancel_requested', 'progress', 'phase', 'phase_since')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  local url = redis.call('HGET', KEYS[1], 'notify_url')
  if url and url ~= '' and ARGV[7] ~= '' then
    redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0)
    redis.call('LPUSH', KEYS[6], cjson.encode({job_id = ARGV[1], url = url, body = ARGV[7], attempt = 0}))
  end
  job_finished(KEYS[1], ARGV[1], new, ARGV[3], ARGV[4])
end
return {1, new}
"""

# KEYS: processing list, queue, pushes, requeued, cancelled.  ARGV: max attempts, job key prefix, now.
# Gives every entry of a dead worker's processing list back to the queue (as the next to run),
# except finished jobs (dropped) and jobs that used up their attempts (returned to the caller,
# which fails them through transition()).
_REQUEUE_LUA = _CHANGED_LUA + _SLOTS_LUA + """
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
      redis.call('HDEL', key, 'worker', 'progress', 'phase', 'phase_since')
      push_front(Q, key, id, entry)
      redis.call('LREM', KEYS[1], 1, entry)
      job_changed(key, id, status, 'queued', ARGV[3])
      requeued = requeued + 1
    end
  else
    redis.call('LREM', KEYS[1], 1, entry)
  end
end
return {requeued, over}
"""

# KEYS: slots set. ARGV: member, max nodes, member to convert ('' = none).
# 1 when the member holds a slot: already, by converting the worker's own slot `convert`, or a free one.
_ACQUIRE_SLOT_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if ARGV[3] ~= '' and redis.call('SREM', KEYS[1], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: owned hash, node record, intents hash. ARGV: workload, owned JSON, intent id, then record pairs.
# A launched (or adopted) workload becomes this worker's node only if nobody claimed it first.
_OWN_NODE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS: job, queue, pushes, idempotency key.  ARGV: idempotency record ('' = no key), its ttl, then
# id, type, params, created_at, complete_by, max_time, notify_url. The script writes the record (so
# the request sends 9 values instead of 22 field/value pairs) and the entry. Returns '' when queued,
# else the idempotency record already stored (nothing is written then).
_SUBMIT_LUA = Template("""
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
-- the GET /jobs indexes, the job's history and the submission counter of /metrics
local now = tonumber(ARGV[6])
redis.call('ZADD', '${index}', now, id)
redis.call('ZADD', '${by_type}' .. job_type, now, id)
redis.call('ZADD', '${by_status}queued', now, id)
redis.call('RPUSH', '${history_prefix}' .. id .. '${history_suffix}', cjson.encode({status = 'queued', at = now}))
redis.call('HINCRBY', '${jobs_total}', job_type .. '|queued', 1)
return ''
""").substitute(_LUA_NAMES)

# The queue position of a queued job from its status, slot and entry (see queue_position()).
_POSITION_FN_LUA = _SLOTS_LUA + """
local function position_of(Q, id, status, slot, entry)
  if status ~= 'queued' then return nil end
  slot = tonumber(slot or '')
  if slot == nil then
    -- a record from before queue slots: find it the old (O(N)) way
    local index = redis.call('LPOS', Q[1], entry or '', 'RANK', -1)
    if not index then return nil end
    return redis.call('LLEN', Q[1]) - index
  end
  local right = queue_right(Q)
  if not in_queue(Q, id, slot, right) then return nil end
  return right - slot + 1 - redis.call('ZCOUNT', Q[4], slot + 1, right)
end
"""

# KEYS: job, queue, pushes, requeued, cancelled.  ARGV: id.
# 1 for the job that runs next; nil when the job is not queued or its entry is no longer in the queue.
_POSITION_LUA = _POSITION_FN_LUA + """
local record = redis.call('HMGET', KEYS[1], 'status', 'queue_slot', 'queue_entry')
return position_of({KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[1], record[1], record[2], record[3])
"""

# KEYS: job, queue, pushes, requeued, cancelled.  ARGV: id.
# The record's field/value pairs (empty when there is none) and, for a queued job, the pair
# 'queue_position', position ('' when its entry is no longer in the queue): /status in one round trip.
_RECORD_WITH_POSITION_LUA = _POSITION_FN_LUA + """
local flat = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
if record['status'] == 'queued' then
  local position = position_of({KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[1], 'queued', record['queue_slot'],
    record['queue_entry'])
  table.insert(flat, 'queue_position')
  table.insert(flat, position and tostring(position) or '')
end
return flat
"""

# KEYS: job, processing list, queue, pushes, requeued, cancelled.  ARGV: entry, worker ('' = any), now.
# Moves an entry from a worker's processing list back to the front of the queue if its job is queued
# (taken, not started) or running on that worker (put back: the attempt is not counted); otherwise
# (cancelled meanwhile, or finished) the entry is only dropped. 1 when the entry went back.
_PUT_BACK_LUA = _CHANGED_LUA + _SLOTS_LUA + Template("""
local Q = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local status = redis.call('HGET', KEYS[1], 'status')
local back = 0
if status == 'queued' and ARGV[2] == '' then
  back = 1
elseif status == 'running' and ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'worker', 'progress', 'phase', 'phase_since')
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  back = 2
end
redis.call('LREM', KEYS[2], 1, ARGV[1])
if back > 0 then
  local id = cjson.decode(ARGV[1])['id']
  push_front(Q, KEYS[1], id, ARGV[1])
  job_changed(KEYS[1], id, back == 2 and 'running' or 'queued', 'queued', ARGV[3])
  -- running -> queued published the queue move already; a job that stayed queued only changed place
  if back == 1 then redis.call('PUBLISH', '${queue_channel}', id) end
  back = 1
end
return back
""").substitute(_LUA_NAMES)

FILE_SECRET_KEY = "config:file_url_secret"  # noqa: S105 (a key name, not a secret)
QUEUE_KEYS = (config.QUEUE_KEY, config.QUEUE_PUSHES_KEY, config.QUEUE_REQUEUED_KEY, config.QUEUE_CANCELLED_KEY)
_SHA1: dict[str, str] = {}


def script_sha(script: str) -> str:
    sha = _SHA1.get(script)
    if sha is None:
        sha = _SHA1[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 (Redis' script id)
    return sha


def run_script(r: redis.Redis, script: str, keys: list[str] | tuple[str, ...], *args: Any) -> Any:
    """EVALSHA a script (one round trip), loading it on the first NOSCRIPT."""
    sha = script_sha(script)
    try:
        return r.evalsha(sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return r.eval(script, len(keys), *keys, *args)


def connect(url: str, timeout_s: float = 5.0, max_connections: int = 100) -> redis.Redis:
    """A client with timeouts, so that a dead Redis gives an error instead of a hang. Its pool makes a
    thread wait (up to timeout_s) for a free connection instead of failing at once when all
    max_connections are busy, as a burst of woken /events streams can make them."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, decode_responses=True,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


def job_key(job_id: str) -> str:
    return config.JOB_KEY.format(id=job_id)


def processing_key(worker_id: str) -> str:
    return config.PROCESSING_KEY.format(worker=worker_id)


def heartbeat_key(worker_id: str) -> str:
    return config.HEARTBEAT_KEY.format(worker=worker_id)


def node_key(worker_id: str, node_type: str) -> str:
    return config.NODE_KEY.format(worker=worker_id, type=node_type)


RESERVED = "*"  # the slot type of a worker that reserved a slot before it knew which node its job needs


def slot_member(worker_id: str, node_type: str) -> str:
    return f"{worker_id}|{node_type}" if node_type else worker_id


def split_slot_member(member: str) -> tuple[str, str]:
    """(worker, node type); a member without a type (written by an older worker) is (worker, '')."""
    worker, sep, node_type = member.rpartition("|")
    return (worker, node_type) if sep else (member, "")


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


def get_job_with_position(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    """The record, and for a queued job its queue position in the same round trip, under the key
    "queue_position" (not a stored field: the number as text, '' when the entry is no longer in the
    queue). What /status reads; queue_position() explains the count."""
    pairs = run_script(r, _RECORD_WITH_POSITION_LUA, (job_key(job_id), *QUEUE_KEYS), job_id)
    return dict(zip(pairs[::2], pairs[1::2], strict=True)) or None


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
    cursor: str | None = None, scan_budget: int = 2000,
) -> tuple[list[dict[str, str]], str | None]:
    """Job records newest first, and the cursor of the next page (None at the end).

    Reads the status index (or the type index, or the index of all jobs) from the cursor on, so a page
    costs O(limit). Only status and type together filter the status index by type; a page then reads at
    most scan_budget entries and may come back short, with a cursor to go on from. Entries whose record
    has expired are dropped from the index on the way. Stable under inserts: new jobs sort before the
    cursor, so they never shift a later page.
    """
    if status:
        index = config.JOBS_BY_STATUS_KEY.format(status=status)
    elif job_type:
        index = config.JOBS_BY_TYPE_KEY.format(type=job_type)
    else:
        index = config.JOBS_INDEX_KEY
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
            pipe.hgetall(job_key(member))
        records = pipe.execute()
        gone = [member for (member, _score), record in zip(batch, records, strict=True) if not record]
        if gone:
            r.zrem(index, *gone)
        for (member, score), record in zip(batch, records, strict=True):
            if record and (not status or record.get("status") == status) \
                    and (not job_type or record.get("type") == job_type):
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
    return run_script(r, _POSITION_LUA, (job_key(record["id"]), *QUEUE_KEYS), record["id"])


def add_queue_positions(r: redis.Redis, records: list[dict[str, str]]) -> None:
    """Put each queued record's queue position under "queue_position", as get_job_with_position does,
    for a whole page of records in one round trip (a pipeline of the position script)."""
    queued = [record for record in records if record.get("status") == "queued"]
    if not queued:
        return
    sha = script_sha(_POSITION_LUA)

    def positions() -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for record in queued:
            pipe.evalsha(sha, 1 + len(QUEUE_KEYS), job_key(record["id"]), *QUEUE_KEYS, record["id"])
        return pipe.execute(raise_on_error=False)

    results = positions()
    if any(isinstance(result, redis.exceptions.NoScriptError) for result in results):
        r.script_load(_POSITION_LUA)  # Redis restarted or was flushed since this process loaded it
        results = positions()
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
    run_script(r, _PUT_BACK_LUA, (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS), entry, "",
               repr(time.time()))


def put_back(r: redis.Redis, worker_id: str, job_id: str, entry: str) -> bool:
    """Give a running job back to the queue (worker shutting down); it runs next, attempt not counted."""
    return bool(run_script(r, _PUT_BACK_LUA, (job_key(job_id), processing_key(worker_id), *QUEUE_KEYS),
                           entry, worker_id, repr(time.time())))


def dead_workers(r: redis.Redis) -> list[str]:
    """Registered workers whose heartbeat key has expired."""
    holders = {split_slot_member(m)[0] for m in r.smembers(config.NODE_SLOTS_KEY)}
    workers = sorted(r.smembers(config.WORKERS_KEY) | holders)
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
        if r.llen(processing_key(worker)) == 0 and not slot_types(r, worker):
            r.srem(config.WORKERS_KEY, worker)
    return summary


def requeue_processing(r: redis.Redis, settings: config.Settings, worker: str) -> tuple[int, list[str]]:
    """Give every entry of one worker's processing list back to the queue (jobs out of attempts fail).

    For a dead worker (the sweep), or for a live worker itself when it runs no job: after a Redis error
    cut a job short, its entry is left in the processing list and nobody else would ever give it back.
    Returns (entries requeued, ids of jobs failed after MAX_ATTEMPTS).
    """
    requeued, over = run_script(r, _REQUEUE_LUA, (processing_key(worker), *QUEUE_KEYS),
                                settings.max_attempts, config.JOB_KEY.format(id=""), repr(time.time()))
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
        _CHANGED_LUA + "if redis.call('HGET', KEYS[1], 'status') == 'running' "
        "and redis.call('HGET', KEYS[1], 'progress') ~= ARGV[1] then "
        "redis.call('HSET', KEYS[1], 'progress', ARGV[1]) job_changed(KEYS[1], ARGV[2], 'running', 'running', '0') "
        "end return 0",
        1, job_key(job_id), str(int(percent)), job_id,
    )


def notify_changed(r: redis.Redis, job_id: str) -> None:
    """Tell /events listeners that a job record changed outside the scripts above (e.g. its phase)."""
    r.eval(_CHANGED_LUA + "if redis.call('EXISTS', KEYS[1]) == 1 then "
           "job_changed(KEYS[1], ARGV[1], 'same', 'same', '0') end return 0", 1, job_key(job_id), job_id)


def set_phase(r: redis.Redis, job_id: str, phase: str, now: float | None = None) -> None:
    """Record what a running job is doing now and since when (only while it runs: finished jobs never
    change). A new phase drops the percentage, which belonged to the phase it was measured in."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    r.eval(
        _CHANGED_LUA + "if redis.call('HGET', KEYS[1], 'status') == 'running' and "
        "redis.call('HGET', KEYS[1], 'phase') ~= ARGV[1] then "
        "redis.call('HSET', KEYS[1], 'phase', ARGV[1], 'phase_since', ARGV[2]) "
        "redis.call('HDEL', KEYS[1], 'progress') job_changed(KEYS[1], ARGV[3], 'running', 'running', '0') end return 0",
        1, job_key(job_id), phase, repr(time.time() if now is None else now), job_id,
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

# KEYS: in-flight list, job, retry set, outcome counters.  ARGV: in-flight entry, outcome, attempt number,
# error, now, retry entry ('' = none), retry time, history cap, job id. Counts the outcome for /metrics
# and wakes /events listeners. Does nothing (returns 0) when the entry is no
# longer in the in-flight list: it was given back to the outbox (shutdown, sweep) or settled already.
_SETTLE_WEBHOOK_LUA = _CHANGED_LUA + _HISTORY_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'webhook_status', ARGV[2], 'webhook_attempts', ARGV[3], 'webhook_error', ARGV[4],
             'webhook_updated_at', ARGV[5])
  local event = {at = tonumber(ARGV[5]), attempt = tonumber(ARGV[3]), outcome = ARGV[2]}
  if ARGV[4] ~= '' then event['error'] = ARGV[4] end
  add_history(KEYS[2], event, tonumber(ARGV[8]))
  job_changed(KEYS[2], ARGV[9], 'same', 'same', ARGV[5])
end
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6]) end
return 1
"""

# KEYS: job, outbox.  ARGV: job id, webhook body, now, history cap.
_RESEND_WEBHOOK_LUA = _CHANGED_LUA + _HISTORY_LUA + """
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
job_changed(KEYS[1], ARGV[1], 'same', 'same', ARGV[3])
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
    return bool(r.eval(_SETTLE_WEBHOOK_LUA, 4, webhook_inflight_key(worker_id), job_key(job_id),
                       config.WEBHOOK_RETRY_KEY, config.WEBHOOK_OUTCOMES_KEY, raw_entry, outcome, str(attempt),
                       error[:500], repr(time.time()), retry_entry, repr(retry_at), config.WEBHOOK_HISTORY_MAX,
                       job_id))


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

def acquire_node_slot(r: redis.Redis, worker_id: str, max_nodes: int, node_type: str = RESERVED,
                      convert_from: str = "") -> bool:
    """Take one of the MAX_NODES slots for this worker's node of node_type (atomic); True if it holds one.

    convert_from names another slot type of the same worker (its reservation, or a node it has just
    stopped) that is turned into this one when no slot is free, so the slot never goes back to the pool.
    """
    convert = slot_member(worker_id, convert_from) if convert_from else ""
    return bool(r.eval(_ACQUIRE_SLOT_LUA, 1, config.NODE_SLOTS_KEY, slot_member(worker_id, node_type),
                       max_nodes, convert))


def slot_types(r: redis.Redis, worker_id: str) -> list[str]:
    """The slot types a worker holds (node types, or RESERVED)."""
    members = (split_slot_member(m) for m in r.smembers(config.NODE_SLOTS_KEY))
    return sorted(node_type for worker, node_type in members if worker == worker_id)


def record_node(r: redis.Redis, worker_id: str, node_type: str, node: dict[str, Any]) -> None:
    r.hset(node_key(worker_id, node_type), mapping={k: str(v) for k, v in node.items()})


def get_node(r: redis.Redis, worker_id: str, node_type: str) -> dict[str, str] | None:
    return r.hgetall(node_key(worker_id, node_type)) or None


def release_node(r: redis.Redis, worker_id: str, node_type: str | None = None, keep_slot: bool = False,
                 workload: str = "") -> None:
    """The worker's node of node_type (None: every one) is stopped or never launched: forget its record,
    its entry in the registry of our nodes (workload), and free its slot unless keep_slot."""
    types = slot_types(r, worker_id) if node_type is None else [node_type]
    pipe = r.pipeline(transaction=True)
    for kind in types:
        pipe.delete(node_key(worker_id, kind))
        if not keep_slot:
            pipe.srem(config.NODE_SLOTS_KEY, slot_member(worker_id, kind))
    if workload:
        pipe.hdel(config.NODES_OWNED_KEY, workload)
    pipe.execute()


def claim_dead_nodes(r: redis.Redis, worker_id: str) -> list[tuple[str, dict[str, str]]] | None:
    """For the recovery sweep: (type, node record) of each slot of a dead worker, claimed by one
    sweeper at a time (None when the worker is alive or another sweeper has it)."""
    if r.exists(heartbeat_key(worker_id)):
        return None
    if not r.set(f"sweep:{worker_id}", "1", nx=True, ex=120):
        return None
    return [(kind, get_node(r, worker_id, kind) or {}) for kind in slot_types(r, worker_id)]


# --- launch windows and the registry of the nodes this service launched ---------------------------
# The provider lets no client label a workload (docs/node-protocols.md, Comput3 control API): our nodes
# are known by the ids we stored (nodes:owned) and, for a launch whose answer never arrived, by its
# recorded window (nodes:launching: who launched which type when, and which workloads were running
# before).

def begin_launch(r: redis.Redis, worker_id: str, node_type: str, before: list[str], now: float) -> str:
    """Record a launch intent before calling the provider's launch; return its id."""
    intent_id = uuid.uuid4().hex
    r.hset(config.LAUNCH_INTENTS_KEY, intent_id, json.dumps(
        {"worker": worker_id, "type": node_type, "before": sorted(before), "started_at": now}))
    return intent_id


def orphan_launch(r: redis.Redis, intent_id: str, ended_at: float) -> None:
    """The launcher could not tell what its launch created: leave the window to the sweep."""
    raw = r.hget(config.LAUNCH_INTENTS_KEY, intent_id)
    if raw:
        intent = json.loads(raw)
        intent.update(orphan=True, ended_at=ended_at)
        r.hset(config.LAUNCH_INTENTS_KEY, intent_id, json.dumps(intent))


def close_launch(r: redis.Redis, intent_id: str) -> None:
    r.hdel(config.LAUNCH_INTENTS_KEY, intent_id)


def launch_intents(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in r.hgetall(config.LAUNCH_INTENTS_KEY).items()}


def own_node(r: redis.Redis, worker_id: str, node_type: str, workload: str, node: str, launched_at: float,
             intent_id: str = "") -> bool:
    """Make a launched (or adopted) workload this worker's node: registry entry, node record and the
    end of the launch intent, in one step. False when someone else claimed that workload first."""
    owned = json.dumps({"worker": worker_id, "type": node_type, "node": node, "launched_at": launched_at})
    record = {"state": "booting", "workload": workload, "node": node, "launched_at": repr(launched_at),
              "worker": worker_id, "type": node_type}
    argv: list[Any] = [workload, owned, intent_id]
    for key, value in record.items():
        argv += [key, value]
    return bool(r.eval(_OWN_NODE_LUA, 3, config.NODES_OWNED_KEY, node_key(worker_id, node_type),
                       config.LAUNCH_INTENTS_KEY, *argv))


def claim_workload(r: redis.Redis, workload: str, owner: dict[str, Any]) -> bool:
    """Claim a workload in the registry (the sweep, before stopping one nobody holds)."""
    return bool(r.hsetnx(config.NODES_OWNED_KEY, workload, json.dumps(owner)))


def owned_nodes(r: redis.Redis) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in r.hgetall(config.NODES_OWNED_KEY).items()}


def forget_owned(r: redis.Redis, workload: str) -> None:
    r.hdel(config.NODES_OWNED_KEY, workload)


def file_url_secret(r: redis.Redis, configured: str) -> bytes:
    """The secret that signs local /files URLs: FILE_URL_SECRET, or one made once and kept in Redis."""
    if configured:
        return configured.encode()
    r.set(FILE_SECRET_KEY, secrets.token_hex(32), nx=True)
    return r.get(FILE_SECRET_KEY).encode()
