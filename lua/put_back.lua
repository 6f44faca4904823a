-- put_back: move an entry from a worker's processing list back to the front of the queue if its job
-- is queued (taken, not started) or runs on that worker in the given attempt (put back: the attempt is
-- not counted); otherwise (cancelled meanwhile, finished, or no longer this worker's: the sweep gave it
-- back, another worker runs it) the entry is only dropped. A job that stayed queued goes back only when
-- its entry was in the processing list: one the sweep gave back already is in the queue.
--
-- KEYS: [1] job hash (JOB_KEY)  [2] the worker's processing list (PROCESSING_KEY)  [3] queue (QUEUE_KEY)
--       [4] pushes (QUEUE_PUSHES_KEY)  [5] requeued (QUEUE_REQUEUED_KEY)  [6] cancelled (QUEUE_CANCELLED_KEY)
-- ARGV: [1] entry  [2] worker the running job must be on ('' = the job must still be queued)  [3] now
--       [4] the attempt the running job must be in (its claim's; with ARGV[2])
-- Returns: 1 when the entry went back, 0 when it was dropped.
-- Names: queue_channel (QUEUE_EVENTS_CHANNEL)
--! uses: job_changed, queue_slots, owned_by
local Q = {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}
local status = redis.call('HGET', KEYS[1], 'status')
local removed = redis.call('LREM', KEYS[2], 1, ARGV[1])
local back = 0
if status == 'queued' and ARGV[2] == '' and removed > 0 then
  back = 1
elseif ARGV[2] ~= '' and owned_by(KEYS[1], ARGV[2], ARGV[4]) then
  -- (pushed even if its entry was missing from the list: a queued job needs one)
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'worker', 'progress', 'phase', 'phase_since')
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  back = 2
end
if back > 0 then
  local id = cjson.decode(ARGV[1])['id']
  push_front(Q, KEYS[1], id, ARGV[1])
  job_changed(KEYS[1], id, back == 2 and 'running' or 'queued', 'queued', ARGV[3])
  -- running -> queued published the queue move already; a job that stayed queued only changed place
  if back == 1 then redis.call('PUBLISH', '${queue_channel}', id) end
  back = 1
end
return back
