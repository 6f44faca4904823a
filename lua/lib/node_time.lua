-- node_time: bring a pool node's time accounts up to `now`; called before any change of its jobs or state.
-- Every second of a node's life goes to one place: shared equally among the jobs that lease it (each
-- lease's `share`), or, while no job leases it, to the node's `pending` (boot and idle time, which the
-- next job to lease it takes, or the last job it ran when it stops). The seconds are also counted by kind
-- (booting, busy, idle) for /metrics.
-- Names: node_time
local function node_time(node_key, leases_key, now)
  local at = tonumber(redis.call('HGET', node_key, 'acct_at') or '')
  if not at then
    redis.call('HSET', node_key, 'acct_at', now)
    return
  end
  local dt = now - at
  if dt <= 0 then return end
  local flat = redis.call('HGETALL', leases_key)
  local jobs = #flat / 2
  local state = redis.call('HGET', node_key, 'state')
  local kind = 'idle'
  if state == 'launching' or state == 'booting' then kind = 'booting' elseif jobs > 0 then kind = 'busy' end
  redis.call('HINCRBYFLOAT', '${node_time}', kind, dt)
  if jobs > 0 then
    for i = 1, #flat, 2 do
      local lease = cjson.decode(flat[i + 1])
      lease['share'] = (lease['share'] or 0) + dt / jobs
      redis.call('HSET', leases_key, flat[i], cjson.encode(lease))
    end
  else
    redis.call('HINCRBYFLOAT', node_key, 'pending', dt)
  end
  redis.call('HSET', node_key, 'acct_at', now)
end
