-- pool_release: a job's lease of a pool node ends. Its share of the node's time goes to the job's record
-- (node_seconds, node_type; with its engine's run time, engine_seconds), the node notes it as its last
-- job, the service's job-time estimate moves,
-- and a node left with no job is idle from now (its type too when no node of the type runs a job).
--
-- KEYS: [1] the node (POOL_NODE_KEY)  [2] its leases (POOL_LEASES_KEY)  [3] the job (JOB_KEY)
--       [4] pool nodes (POOL_NODES_KEY)  [5] pool stats (POOL_STATS_KEY)
-- ARGV: [1] job id  [2] now  [3] the job's seconds on the node ('' = not measured: no estimate change)
-- Returns: the job's share in node-seconds (as text), or -1 when it held no lease there.
-- Names: pool_node, pool_leases
--! uses: node_time
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return '-1' end
local now = tonumber(ARGV[2])
node_time(KEYS[1], KEYS[2], now)
local lease = cjson.decode(redis.call('HGET', KEYS[2], ARGV[1]))
redis.call('HDEL', KEYS[2], ARGV[1])
local share = lease['share'] or 0
local node_type = redis.call('HGET', KEYS[1], 'type') or ''
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'node_seconds', share)
  redis.call('HSET', KEYS[3], 'node_type', node_type)
end
redis.call('HSET', KEYS[1], 'last_job', ARGV[1])
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'idle_since', now)
  local busy = false
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    if redis.call('HGET', '${pool_node}' .. id, 'type') == node_type
        and redis.call('HLEN', '${pool_leases}' .. id) > 0 then
      busy = true
      break
    end
  end
  if not busy then redis.call('HSET', KEYS[5], 'idle_since:' .. node_type, now) end
end
if ARGV[3] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('HINCRBYFLOAT', KEYS[3], 'engine_seconds', tonumber(ARGV[3]))
  end
  local name = 'service:' .. lease['service']
  local old = tonumber(redis.call('HGET', KEYS[5], name) or '')
  local sample = tonumber(ARGV[3])
  redis.call('HSET', KEYS[5], name, old and (old + 0.3 * (sample - old)) or sample)
end
return tostring(share)
