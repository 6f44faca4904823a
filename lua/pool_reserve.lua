-- pool_reserve: take one of the MAX_NODES places of the pool for a node about to be launched (state
-- launching), with a lease of one of its slots for the job that needs it (none for a pre-warm).
--
-- KEYS: [1] pool nodes (POOL_NODES_KEY)  [2] the node (POOL_NODE_KEY)  [3] its leases (POOL_LEASES_KEY)
-- ARGV: [1] node id  [2] node type  [3] launching worker  [4] now  [5] max nodes
--       [6] job id ('' = none)  [7] the lease (JSON: worker, service, since)
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
else
  redis.call('HSET', KEYS[2], 'idle_since', ARGV[4])
end
return 1
