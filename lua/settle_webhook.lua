-- settle_webhook: record one delivery attempt's outcome and take its entry off the worker's
-- in-flight list, in one step: the job's webhook status fields and a webhook_history event, the
-- outcome counter of /metrics, a wake-up for /events listeners, and the retry when there is one.
--
-- KEYS: [1] the worker's in-flight list (WEBHOOK_INFLIGHT_KEY)  [2] job hash (JOB_KEY)
--       [3] retry set (WEBHOOK_RETRY_KEY)  [4] outcome counters (WEBHOOK_OUTCOMES_KEY)
-- ARGV: [1] in-flight entry  [2] outcome  [3] attempt number  [4] error  [5] now
--       [6] retry entry ('' = none)  [7] retry time  [8] history cap (WEBHOOK_HISTORY_MAX)  [9] job id
-- Returns: 1, or 0 (nothing done) when the entry is no longer in the in-flight list: it was given back
--          to the outbox (shutdown, sweep) or settled already.
-- Names: none
--! uses: job_changed, add_history
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'webhook_status', ARGV[2], 'webhook_attempts', ARGV[3], 'webhook_error', ARGV[4],
             'webhook_updated_at', ARGV[5])
  local event = {at = tonumber(ARGV[5]), attempt = tonumber(ARGV[3]), outcome = ARGV[2]}
  if ARGV[4] ~= '' then event['error'] = ARGV[4] end
  add_history(KEYS[2], event, tonumber(ARGV[8]))
  job_changed(KEYS[2], ARGV[9], 'same', 'same', ARGV[5])
end
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6]) end
return 1
