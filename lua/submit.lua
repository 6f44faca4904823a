-- submit: write a new job's record and its queue entry (LPUSH), with the GET /jobs indexes, its
-- history and the submission counter of /metrics (new_job). The script builds the record, so the request
-- sends 12 values instead of 23 field/value pairs.
-- An Idempotency-Key is looked at first: a replay (its record names a job that still exists) writes
-- nothing and is not counted against the rate limit; a record whose job is gone (expired after
-- RESULT_TTL, which may be shorter than the key's 24 h) leaves the key unused. Then the client's
-- submissions of this minute are counted, and one over the limit writes nothing.
--
-- KEYS: [1] job hash (JOB_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] idempotency key (IDEMPOTENCY_KEY; any key when there is none)
--       [5] the client's rate counter of this minute (RATE_KEY; any key when there is no limit)
-- ARGV: [1] idempotency record ('' = no key)  [2] its ttl (s)  [3] id  [4] type  [5] params (JSON)
--       [6] created_at  [7] complete_by  [8] max_time  [9] notify_url  [10] owner (the id of the API key
--       that submits it; '' without keys)  [11] submissions allowed per minute (0 = no limit)
--       [12] the rate counter's ttl (s)
-- Returns: '' when queued (or when a record with this id exists: this submit sent again after an
--          unconfirmed answer, see redis_conn.through_failover; nothing is counted or written then);
--          'rate_limited' when over the limit; else the idempotency record already stored (JSON with
--          job_id or pipeline_id, and request_hash). Nothing is written but when queued.
-- Names: none
--! uses: replay, new_job
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
if ARGV[1] ~= '' then
  local seen = replay(KEYS[4])
  if seen then return seen end
end
local limit = tonumber(ARGV[11])
if limit > 0 then
  local count = redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[12])
  if count > limit then return 'rate_limited' end
end
new_job(KEYS[2], KEYS[3], KEYS[1], ARGV[3], ARGV[4], 'queued', ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9],
        ARGV[10], {})
if ARGV[1] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
return ''
