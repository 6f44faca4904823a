-- finish_job(job_key, id, new, now, ttl, outbox, body): what a job whose status has just become a finished
-- one (new) must also do: its finish time, the running-only fields dropped, its expiry (ttl seconds), its
-- one final webhook queued in the outbox (WEBHOOK_OUTBOX_KEY) when it has a notify_url and a body is given,
-- and job_finished (metrics, indexes, history).
-- Names: none
--! uses: job_finished
local function finish_job(job_key, id, new, now, ttl, outbox, body)
  redis.call('HSET', job_key, 'finished_at', now)
  redis.call('HDEL', job_key, 'cancel_requested', 'progress', 'phase', 'phase_since')
  redis.call('EXPIRE', job_key, tonumber(ttl))
  local url = redis.call('HGET', job_key, 'notify_url')
  if url and url ~= '' and body ~= '' then
    redis.call('HSET', job_key, 'webhook_status', 'pending', 'webhook_attempts', 0)
    redis.call('LPUSH', outbox, cjson.encode({job_id = id, url = url, body = body, attempt = 0}))
  end
  job_finished(job_key, id, new, now, ttl)
end
