-- job_finished(job_key, job_id, new, now, ttl): what a job reaching a finished status must also do.
--
-- Counts it for /metrics (jobs per type and status, the duration histogram), keeps it among the
-- recent finishes (one day), expires its history with the record (ttl seconds) and trims the
-- GET /jobs indexes past their retention (ttl + horizon): all jobs, the job's type, status and owner.
-- Names: jobs_total (JOBS_TOTAL_KEY), duration (JOB_DURATION_KEY), buckets (DURATION_BUCKETS),
--        recent (FINISHED_RECENT_KEY), history_prefix/history_suffix (JOB_HISTORY_KEY),
--        horizon (INDEX_HORIZON_S), index (JOBS_INDEX_KEY), by_type (JOBS_BY_TYPE_KEY),
--        by_status (JOBS_BY_STATUS_KEY), by_owner (JOBS_BY_OWNER_KEY)
local function job_finished(job_key, job_id, new, now, ttl)
  local job_type = redis.call('HGET', job_key, 'type') or 'unknown'
  redis.call('HINCRBY', '${jobs_total}', job_type .. '|' .. new, 1)
  local started = redis.call('HGET', job_key, 'started_at')
  if started then
    local seconds = tonumber(now) - tonumber(started)
    local bound = '+Inf'
    for _, b in ipairs({${buckets}}) do
      if seconds <= b then bound = tostring(b) break end
    end
    local key = '${duration}' .. job_type
    redis.call('HINCRBY', key, bound, 1)
    redis.call('HINCRBY', key, 'count', 1)
    redis.call('HINCRBYFLOAT', key, 'sum', seconds)
  end
  redis.call('ZADD', '${recent}', now, job_id)
  redis.call('ZREMRANGEBYSCORE', '${recent}', '-inf', tonumber(now) - 86400)
  redis.call('EXPIRE', '${history_prefix}' .. job_id .. '${history_suffix}', ttl)
  local horizon = tonumber(now) - tonumber(ttl) - ${horizon}
  local indexes = {'${index}', '${by_type}' .. job_type, '${by_status}' .. new}
  local owner = redis.call('HGET', job_key, 'owner') or ''
  if owner ~= '' then table.insert(indexes, '${by_owner}' .. owner) end
  for _, key in ipairs(indexes) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  end
end
