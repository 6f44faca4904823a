-- pool_reserve: take one of the MAX_NODES places of the pool for a node about to be launched (state
-- launching), with a lease of one of its slots for the job that needs it (none for a pre-warm). A job
-- that launches a node ends its type's idle gap as a lease does (pool_lease): the gaps that end in a
-- cold start are the long ones the keep-alive policy must see.
--
-- KEYS: [1] pool nodes (POOL_NODES_KEY)  [2] the node (POOL_NODE_KEY)  [3] its leases (POOL_LEASES_KEY)
--       [4] pool stats (POOL_STATS_KEY)  [5] the node type's idle gaps (POOL_GAPS_KEY)
-- ARGV: [1] node id  [2] node type  [3] launching worker  [4] now  [5] max nodes
--       [6] job id ('' = none)  [7] the lease (JSON: worker, service, since)  [8] gaps kept
-- Returns: 1 when the place is taken, 0 when MAX_NODES nodes are in the pool already.
-- Names: none
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'type', ARGV[2], 'state', 'launching', 'launcher', ARGV[3],
           'launched_at', ARGV[4], 'acct_at', ARGV[4], 'pending', 0)
if ARGV[6] ~= '' then
  local lease = cjson.decode(ARGV[7])
  lease['share'] = 0
  redis.call('HSET', KEYS[3], ARGV[6], cjson.encode(lease))
  local idle = tonumber(redis.call('HGET', KEYS[4], 'idle_since:' .. ARGV[2]) or '')
  if idle then
    redis.call('RPUSH', KEYS[5], tostring(math.max(0, tonumber(ARGV[4]) - idle)))
    redis.call('LTRIM', KEYS[5], -tonumber(ARGV[8]), -1)
    redis.call('HDEL', KEYS[4], 'idle_since:' .. ARGV[2])
  end
else
  redis.call('HSET', KEYS[2], 'idle_since', ARGV[4])
end
return 1
