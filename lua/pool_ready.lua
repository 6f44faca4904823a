-- pool_ready: a booting pool node answers its health check: it is ready, its boot time (launch to
-- ready) moves the node type's boot estimate, and with no job on it, it is idle from now.
--
-- KEYS: [1] the node (POOL_NODE_KEY)  [2] its leases (POOL_LEASES_KEY)  [3] pool stats (POOL_STATS_KEY)
-- ARGV: [1] now
-- Returns: the boot seconds (as text) when the node became ready now, '' when it was not booting.
-- Names: none
--! uses: node_time
if redis.call('HGET', KEYS[1], 'state') ~= 'booting' then return '' end
local now = tonumber(ARGV[1])
node_time(KEYS[1], KEYS[2], now)
redis.call('HSET', KEYS[1], 'state', 'ready', 'ready_at', now, 'checked_at', now)
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('HSET', KEYS[1], 'idle_since', now) end
local boot = math.max(0, now - tonumber(redis.call('HGET', KEYS[1], 'launched_at')))
local name = 'boot:' .. redis.call('HGET', KEYS[1], 'type')
local old = tonumber(redis.call('HGET', KEYS[3], name) or '')
redis.call('HSET', KEYS[3], name, old and (old + 0.3 * (boot - old)) or boot)
return tostring(boot)
