-- acquire_slot: take one of the MAX_NODES node slots for a worker's node of one type.
--
-- KEYS: [1] slots set (NODE_SLOTS_KEY)
-- ARGV: [1] member ("<worker>|<type>")  [2] max nodes  [3] member to convert ('' = none): another slot
--       of the same worker (its reservation, or a node it has just stopped) turned into this one
-- Returns: 1 when the member holds a slot (already, by converting ARGV[3], or a free one), else 0.
-- Names: none
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if ARGV[3] ~= '' and redis.call('SREM', KEYS[1], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[1], ARGV[1])
  return 1
end
return 0
