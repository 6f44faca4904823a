-- pool_forget: a pool node was stopped (or its launch failed): settle its time accounts and remove it.
-- Its pending idle time goes to the last job it ran (or, if it ran none, counts as unattributed); the
-- jobs still leasing it (a node stopped under its jobs) take their shares.
--
-- KEYS: [1] the node (POOL_NODE_KEY)  [2] its leases (POOL_LEASES_KEY)  [3] pool nodes (POOL_NODES_KEY)
--       [4] registry of our nodes (NODES_OWNED_KEY)
-- ARGV: [1] node id  [2] now
-- Returns: {workload, node, type, launched_at} of the node ('' each when it never launched), or {} when
--          it was not in the pool.
-- Names: job_prefix, node_time
--! uses: node_time
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {}
end
node_time(KEYS[1], KEYS[2], tonumber(ARGV[2]))
local node = redis.call('HMGET', KEYS[1], 'workload', 'node', 'type', 'launched_at', 'pending', 'last_job')
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local job_key = '${job_prefix}' .. flat[i]
  if redis.call('EXISTS', job_key) == 1 then
    redis.call('HINCRBYFLOAT', job_key, 'node_seconds', cjson.decode(flat[i + 1])['share'] or 0)
    redis.call('HSET', job_key, 'node_type', node[3] or '')
  end
end
local pending = tonumber(node[5] or '0') or 0
local last_job = node[6] and ('${job_prefix}' .. node[6]) or ''
if pending > 0 then
  if last_job ~= '' and redis.call('EXISTS', last_job) == 1 then
    redis.call('HINCRBYFLOAT', last_job, 'node_seconds', pending)
  else
    redis.call('HINCRBYFLOAT', '${node_time}', 'unattributed', pending)
  end
end
if node[1] then redis.call('HDEL', KEYS[4], node[1]) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return {node[1] or '', node[2] or '', node[3] or '', node[4] or ''}
