-- own_node: make a launched (or adopted) workload the workload of a pool node, unless somebody claimed
-- it first: its registry entry, the pool node's record and the end of its launch intent.
--
-- KEYS: [1] registry of our nodes (NODES_OWNED_KEY)  [2] the pool node (POOL_NODE_KEY)
--       [3] launch intents (LAUNCH_INTENTS_KEY)
-- ARGV: [1] workload  [2] registry entry (JSON)  [3] launch intent id ('' = none)  [4...] record field, value pairs
-- Returns: 1 when the workload is now ours, 0 when it was claimed already (or the pool node is gone:
--          its launch was given up, and the sweep stops what the launch window shows).
-- Names: none
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
