-- move_due_webhooks: move deliveries whose next attempt is due (at most 100) from the retry set to
-- the back of the outbox (LPUSH: BLMOVE takes from the right), so a retry never overtakes a delivery
-- queued before it was due.
--
-- KEYS: [1] retry set (WEBHOOK_RETRY_KEY)  [2] webhook outbox (WEBHOOK_OUTBOX_KEY)
-- ARGV: [1] now
-- Returns: when the next retry falls due ('' = none), so a taker waits no longer than that.
-- Names: none
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, entry in ipairs(due) do
  redis.call('ZREM', KEYS[1], entry)
  redis.call('LPUSH', KEYS[2], entry)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if next[2] then return next[2] end
return ''
