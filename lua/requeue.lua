-- requeue: give every entry of a worker's processing list back to the queue, as the next to run: jobs
-- still queued (taken, not started) and jobs running on that worker. The entries of finished jobs and of
-- jobs another worker runs now are dropped; jobs that used up their attempts are left in the list and
-- returned, for the caller to fail through transition.
--
-- For a dead worker (the sweep: ARGV[5] = 'dead') nothing moves while the worker's heartbeat key exists:
-- a worker with a fresh heartbeat is never taken for dead, however the sweep came to think so.
--
-- KEYS: [1] the worker's processing list (PROCESSING_KEY)  [2] queue (QUEUE_KEY)
--       [3] pushes (QUEUE_PUSHES_KEY)  [4] requeued (QUEUE_REQUEUED_KEY)  [5] cancelled (QUEUE_CANCELLED_KEY)
--       [6] the worker's heartbeat (HEARTBEAT_KEY)
-- ARGV: [1] max attempts  [2] job key prefix (JOB_KEY without its id)  [3] now  [4] the worker whose
--       list it is  [5] 'dead' when the sweep gives back a dead worker's list, '' for the worker's own
-- Returns: {entries requeued, {entries of jobs out of attempts}}; {-1, {}} when the worker is alive
-- Names: none
--! uses: job_changed, queue_slots
if ARGV[5] == 'dead' and redis.call('EXISTS', KEYS[6]) == 1 then return {-1, {}} end
local Q = {KEYS[2], KEYS[3], KEYS[4], KEYS[5]}
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local over = {}
local requeued = 0
for i = #entries, 1, -1 do
  local entry = entries[i]
  local id = cjson.decode(entry)['id']
  local key = ARGV[2] .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'running' and redis.call('HGET', key, 'worker') ~= ARGV[4] then
    status = 'not ours'  -- a stale entry: the job was given back and another worker runs it
  end
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
