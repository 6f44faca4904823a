-- submit: write a new job's record and its queue entry (LPUSH), with the GET /jobs indexes, its
-- history and the submission counter of /metrics. The script builds the record, so the request
-- sends 9 values instead of 22 field/value pairs; jobstore.queue_entry() gives the same entry.
--
-- KEYS: [1] job hash (JOB_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] idempotency key (IDEMPOTENCY_KEY; any key when there is none)
-- ARGV: [1] idempotency record ('' = no key)  [2] its ttl (s)  [3] id  [4] type  [5] params (JSON)
--       [6] created_at  [7] complete_by  [8] max_time  [9] notify_url
-- Returns: '' when queued (or when a record with this id exists: this submit sent again after an
--          unconfirmed answer, see redis_conn.through_failover), else the idempotency record already
--          stored (nothing is written then).
-- Names: index (JOBS_INDEX_KEY), by_type (JOBS_BY_TYPE_KEY), by_status (JOBS_BY_STATUS_KEY),
--        history_prefix/history_suffix (JOB_HISTORY_KEY), jobs_total (JOBS_TOTAL_KEY)
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
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
local now = tonumber(ARGV[6])
redis.call('ZADD', '${index}', now, id)
redis.call('ZADD', '${by_type}' .. job_type, now, id)
redis.call('ZADD', '${by_status}queued', now, id)
redis.call('RPUSH', '${history_prefix}' .. id .. '${history_suffix}', cjson.encode({status = 'queued', at = now}))
redis.call('HINCRBY', '${jobs_total}', job_type .. '|queued', 1)
return ''
