-- job_changed(job_key, job_id, old, new, now): what every change of a job record must also do.
--
-- Bumps the record's `events` number and PUBLISHes it for /events listeners (and, for a pipeline's step,
-- the pipeline's: pipeline_changed). A status change (old ~= new) also moves the job between the GET /jobs
-- status indexes, appends it to the job's history, and wakes queue-position listeners when the job left
-- or re-entered the queue.
-- Callers that changed something other than the status pass old = new (e.g. 'same', 'same').
-- Names: by_status (JOBS_BY_STATUS_KEY), history_prefix/history_suffix (JOB_HISTORY_KEY),
--        queue_channel (QUEUE_EVENTS_CHANNEL), job_channel (JOB_EVENTS_CHANNEL), pipeline_prefix (PIPELINE_KEY)
--! uses: pipeline_changed
local function job_changed(job_key, job_id, old, new, now)
  if old ~= new then
    local created = redis.call('HGET', job_key, 'created_at') or now
    redis.call('ZREM', '${by_status}' .. old, job_id)
    redis.call('ZADD', '${by_status}' .. new, created, job_id)
    local history = '${history_prefix}' .. job_id .. '${history_suffix}'
    redis.call('RPUSH', history, cjson.encode({status = new, at = tonumber(now)}))
    if old == 'queued' or new == 'queued' then redis.call('PUBLISH', '${queue_channel}', job_id) end
  end
  redis.call('PUBLISH', '${job_channel}' .. job_id, redis.call('HINCRBY', job_key, 'events', 1))
  local pipeline = redis.call('HGET', job_key, 'pipeline')
  if pipeline and pipeline ~= '' then pipeline_changed('${pipeline_prefix}' .. pipeline, pipeline) end
end
