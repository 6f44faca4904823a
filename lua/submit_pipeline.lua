-- submit_pipeline: write a new pipeline's record and every one of its step jobs in one step (new_job): the
-- steps whose inputs are ready are queued as any job, the others are 'waiting' (in no queue) until the
-- steps they take outputs from succeed (pipeline_step, in the transition that finishes those). Idempotency
-- and the rate limit as in submit (the steps are counted as that many submissions).
--
-- KEYS: [1] pipeline hash (PIPELINE_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] idempotency key (IDEMPOTENCY_KEY; any key when there is none)
--       [5] the client's rate counter of this minute (RATE_KEY; any key when there is no limit)
-- ARGV: [1] idempotency record ('' = no key)  [2] its ttl (s)  [3] pipeline id  [4] created_at  [5] owner
--       ('' without keys)  [6] notify_url  [7] graph (JSON: {step: {job, type, needs}})  [8] steps (JSON:
--       {step: job id}, in the client's order)  [9] submissions allowed per minute (0 = no limit)
--       [10] the rate counter's ttl (s)  [11...] per step, in order (queued ones are pushed in it), 9
--       values: job id, type, params (JSON), complete_by, max_time, notify_url, step name, the references
--       it waits for (0 = queued now), inputs_from (JSON: {field: step})
-- Returns: '' when written (or when the pipeline's record exists: this submit sent again after an
--          unconfirmed answer, see redis_conn.through_failover; nothing is counted or written then);
--          'rate_limited' when over the limit; else the idempotency record already
--          stored (JSON with pipeline_id or job_id, and request_hash). Nothing is written but when queued.
-- Names: pipelines_index (PIPELINES_INDEX_KEY), pipelines_by_owner (PIPELINES_BY_OWNER_KEY),
--        job_prefix (JOB_KEY)
--! uses: replay, new_job
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
if ARGV[1] ~= '' then
  local seen = replay(KEYS[4])
  if seen then return seen end
end
local count = (#ARGV - 10) / 9
local limit = tonumber(ARGV[9])
if limit > 0 then
  local used = redis.call('INCRBY', KEYS[5], count)
  redis.call('EXPIRE', KEYS[5], ARGV[10])
  if used > limit then
    redis.call('DECRBY', KEYS[5], count)  -- refused: not counted
    return 'rate_limited'
  end
end
local pid, created, owner, notify_url = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
redis.call('HSET', KEYS[1], 'id', pid, 'status', 'queued', 'created_at', created, 'owner', owner,
  'notify_url', notify_url, 'webhook_status', notify_url ~= '' and 'waiting' or 'none', 'graph', ARGV[7],
  'steps', ARGV[8], 'unfinished', count, 'events', 0)
for i = 11, #ARGV, 9 do
  local id, waits = ARGV[i], tonumber(ARGV[i + 7])
  new_job(KEYS[2], KEYS[3], '${job_prefix}' .. id, id, ARGV[i + 1], waits > 0 and 'waiting' or 'queued',
          ARGV[i + 2], created, ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], owner,
          {'pipeline', pid, 'step', ARGV[i + 6], 'waiting_for', waits, 'inputs_from', ARGV[i + 8]})
end
redis.call('ZADD', '${pipelines_index}', created, pid)
if owner ~= '' then redis.call('ZADD', '${pipelines_by_owner}' .. owner, created, pid) end
if ARGV[1] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2]) end
return ''
