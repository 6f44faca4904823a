-- resend_webhook: queue a finished job's or pipeline's final webhook again (same body, attempts from 0)
-- after it was delivered or failed for good.
--
-- KEYS: [1] job hash (JOB_KEY) or pipeline hash (PIPELINE_KEY)  [2] webhook outbox (WEBHOOK_OUTBOX_KEY)
-- ARGV: [1] job or pipeline id  [2] webhook body  [3] now  [4] history cap (WEBHOOK_HISTORY_MAX)
--       [5] the entry's `record` (a pipeline's key: its delivery state is kept there) or ''
-- Returns: 'queued', or why not: 'missing', 'unfinished', 'no_url', 'busy' (being sent), 'no_body' (a
--          pipeline that finished before its body was kept).
-- Names: none
--! uses: job_changed, add_history
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'success' and status ~= 'failed' and status ~= 'cancelled' then return 'unfinished' end
local url = redis.call('HGET', KEYS[1], 'notify_url')
if not url or url == '' then return 'no_url' end
local hook = redis.call('HGET', KEYS[1], 'webhook_status')
if hook ~= 'failed' and hook ~= 'delivered' then return 'busy' end
if ARGV[2] == '' then return 'no_body' end
redis.call('HSET', KEYS[1], 'webhook_status', 'pending', 'webhook_attempts', 0, 'webhook_error', '',
           'webhook_updated_at', ARGV[3])
add_history(KEYS[1], {at = tonumber(ARGV[3]), attempt = 0, outcome = 'resend requested'}, tonumber(ARGV[4]))
local entry = {job_id = ARGV[1], url = url, body = ARGV[2], attempt = 0}
if ARGV[5] ~= '' then entry.record = ARGV[5] end
redis.call('LPUSH', KEYS[2], cjson.encode(entry))
job_changed(KEYS[1], ARGV[1], 'same', 'same', ARGV[3])
return 'queued'
