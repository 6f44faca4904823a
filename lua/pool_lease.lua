-- pool_lease: give a job a slot of a pool node, when the node is still there (launching, booting or
-- ready), lives long enough for the job, and has a slot of the job's service free. The job takes the
-- node's pending boot and idle time; the first job of a type after all its nodes went idle ends the
-- type's idle gap, noted for the keep-alive policy.
--
-- KEYS: [1] the node (POOL_NODE_KEY)  [2] its leases (POOL_LEASES_KEY)  [3] pool stats (POOL_STATS_KEY)
--       [4] the node type's idle gaps (POOL_GAPS_KEY)
-- ARGV: [1] job id  [2] the lease (JSON: worker, service, since)  [3] the job's service
--       [4] slots of that service on a node  [5] jobs a node runs at once  [6] now
--       [7] the earliest provider expiry the job can live with ('' = any)  [8] gaps kept
-- Returns: 'ok', or why not: 'gone', 'stopping', 'full' or 'short' (expires too soon).
-- Names: none
--! uses: node_time
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'gone' end
if state == 'stopping' then return 'stopping' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'ok' end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '')
if expires and ARGV[7] ~= '' and expires < tonumber(ARGV[7]) then return 'short' end
local total = tonumber(ARGV[5])
if redis.call('HGET', KEYS[1], 'solo') == '1' then total = 1 end
local leases = redis.call('HVALS', KEYS[2])
if #leases >= total then return 'full' end
local same = 0
for _, raw in ipairs(leases) do
  if cjson.decode(raw)['service'] == ARGV[3] then same = same + 1 end
end
if same >= tonumber(ARGV[4]) then return 'full' end
local now = tonumber(ARGV[6])
node_time(KEYS[1], KEYS[2], now)
local lease = cjson.decode(ARGV[2])
lease['share'] = tonumber(redis.call('HGET', KEYS[1], 'pending') or '0')
redis.call('HSET', KEYS[1], 'pending', 0)
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(lease))
redis.call('HDEL', KEYS[1], 'idle_since')
local node_type = redis.call('HGET', KEYS[1], 'type')
local idle = tonumber(redis.call('HGET', KEYS[3], 'idle_since:' .. node_type) or '')
if idle then
  redis.call('RPUSH', KEYS[4], tostring(math.max(0, now - idle)))
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[8]), -1)
  redis.call('HDEL', KEYS[3], 'idle_since:' .. node_type)
end
return 'ok'
