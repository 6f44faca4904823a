-- pool_claim_stop: make this worker the one that stops a pool node, when nobody else does and no job
-- leases it (unless forced: a node that failed under a job). From then on no job can lease it.
--
-- KEYS: [1] the node (POOL_NODE_KEY)  [2] its leases (POOL_LEASES_KEY)
-- ARGV: [1] stopping worker  [2] now  [3] the state it must be in ('' = any)
--       [4] the idle_since it was seen with ('' = any: a job in between leaves it running)  [5] 'force' or ''
-- Returns: 1 when this worker stops it now, else 0.
-- Names: none
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'stopping' then return 0 end
if ARGV[3] ~= '' and state ~= ARGV[3] then return 0 end
if ARGV[5] ~= 'force' and redis.call('HLEN', KEYS[2]) > 0 then return 0 end
if ARGV[4] ~= '' then  -- (times compared as numbers: Lua writes them with fewer digits than Python)
  local seen = tonumber(redis.call('HGET', KEYS[1], 'idle_since') or '')
  if not seen or math.abs(seen - tonumber(ARGV[4])) > 0.001 then return 0 end
end
redis.call('HSET', KEYS[1], 'state', 'stopping', 'stopper', ARGV[1], 'stop_claimed_at', ARGV[2])
return 1
