-- transition: move a job to a new status if that is allowed; the one place a status changes.
-- A finished job never changes again. A queued job that finishes (a cancel) leaves its entry in the
-- queue as a tombstone, noted in the cancelled set. Finishing queues the job's one final webhook. A
-- pipeline's step changes its pipeline in the same step (pipeline_step): its success queues the steps
-- waiting for its outputs, its failure fails them, its pipeline finishes with its last step. A waiting
-- step (its inputs not there yet) can only be cancelled or failed; pipeline_step queues it.
-- A worker's change names the worker and, past the claim, the attempt its claim produced: a claim is
-- refused unless the entry is in that worker's processing list, any other change unless the job runs on
-- that worker in that attempt (a stale worker whose job the sweep gave back changes nothing). Without a
-- worker the change is the API's or the sweep's.
--
-- KEYS: [1] job hash (JOB_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] requeued (QUEUE_REQUEUED_KEY)  [5] cancelled (QUEUE_CANCELLED_KEY)
--       [6] webhook outbox (WEBHOOK_OUTBOX_KEY)  [7] the worker's processing list (PROCESSING_KEY; any
--       key without a worker)
-- ARGV: [1] job id  [2] new status  [3] now  [4] result ttl (s)  [5] worker ('' = none: the API, the
--       sweep)  [6] the worker's attempt (a change after its claim)  [7] queue entry (a worker's claim)
--       [8] webhook body ('' = none)  [9...] field, value pairs to set
-- Returns: {1, new status, attempts} when changed (attempts: the record's, so a claim's attempt number),
--          {0, current status or 'missing'} when refused.
-- Names: none
--! uses: job_changed, finish_job, queue_slots, owned_by, pipeline_step
local Q = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 'missing'} end
local new = ARGV[2]
-- which status may follow which; finished statuses have no successors
local allowed = {
  queued = {running = true, cancelled = true, failed = true},
  waiting = {cancelled = true, failed = true},
  running = {success = true, failed = true, cancelled = true, queued = true},
}
if not allowed[cur] or not allowed[cur][new] then return {0, cur} end
local worker = ARGV[5]
if worker ~= '' then
  if new == 'running' then  -- the claim: the worker holds the entry (the sweep may have given it back)
    if not redis.call('LPOS', KEYS[7], ARGV[7]) then return {0, cur} end
  elseif not owned_by(KEYS[1], worker, ARGV[6]) then
    return {0, cur}
  end
end
local finishing = new == 'success' or new == 'failed' or new == 'cancelled'
if cur == 'queued' and finishing then
  -- (a record from before queue slots has none: its entry stays too, counted by positions until taken)
  local slot = tonumber(redis.call('HGET', KEYS[1], 'queue_slot') or '')
  if slot ~= nil and in_queue(Q, ARGV[1], slot, queue_right(Q)) then
    redis.call('ZADD', KEYS[5], slot, ARGV[1])
  end
end
for i = 9, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'status', new)
job_changed(KEYS[1], ARGV[1], cur, new, ARGV[3])
if new == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
  if worker ~= '' then redis.call('HSET', KEYS[1], 'worker', worker) end
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  trim_slots(Q)
end
if finishing then finish_job(KEYS[1], ARGV[1], new, ARGV[3], ARGV[4], KEYS[6], ARGV[8]) end
if new == 'running' or finishing then pipeline_step(KEYS[1], ARGV[1], new, ARGV[3], ARGV[4], Q, KEYS[6]) end
return {1, new, tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
