-- return_inflight: give every delivery of a worker's in-flight list back to the outbox, as it was,
-- to the end that is taken next.
--
-- KEYS: [1] the worker's in-flight list (WEBHOOK_INFLIGHT_KEY)  [2] webhook outbox (WEBHOOK_OUTBOX_KEY)
-- ARGV: none
-- Returns: how many entries moved.
-- Names: none
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
