-- Queue slots: every place in the queue has an integer slot, so a position costs O(log N)
-- (jobstore.py's docstring explains the scheme). The left end is slot -P (P = LPUSHes ever), the
-- right end -P + LLEN - 1; RPUSHed entries are noted in the requeued set, cancelled entries still
-- in the queue (tombstones) in the cancelled set.
--
-- Q = {queue list, pushes counter, requeued set, cancelled set}, as the scripts pass them in KEYS
-- (QUEUE_KEY, QUEUE_PUSHES_KEY, QUEUE_REQUEUED_KEY, QUEUE_CANCELLED_KEY).
-- queue_right(Q): the slot of the right end (the entry taken next).
-- in_queue(Q, id, slot, right): whether the job whose latest entry went onto `slot` is still queued.
-- push_front(Q, job_key, id, entry): RPUSH a job's entry (it runs next) onto the slot right + 1.
-- trim_slots(Q): forget the slot notes of entries already taken from the right.
-- Names: none
local function queue_right(Q)
  return -tonumber(redis.call('GET', Q[2]) or '0') + redis.call('LLEN', Q[1]) - 1
end

local function in_queue(Q, id, slot, right)
  if slot == nil or slot > right then return false end
  local score = redis.call('ZSCORE', Q[3], id)
  if score then return tonumber(score) == slot end
  return redis.call('ZCOUNT', Q[3], slot, slot) == 0
end

local function push_front(Q, job_key, id, entry)
  local slot = queue_right(Q) + 1
  redis.call('ZREMRANGEBYSCORE', Q[3], slot, slot)
  redis.call('ZREMRANGEBYSCORE', Q[4], slot, slot)
  redis.call('ZADD', Q[3], slot, id)
  redis.call('HSET', job_key, 'queue_slot', slot)
  redis.call('RPUSH', Q[1], entry)
end

local function trim_slots(Q)
  local beyond = '(' .. string.format('%d', queue_right(Q))
  redis.call('ZREMRANGEBYSCORE', Q[3], beyond, '+inf')
  redis.call('ZREMRANGEBYSCORE', Q[4], beyond, '+inf')
end
