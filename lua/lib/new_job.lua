-- new_job(queue, pushes, job_key, id, job_type, status, params, created, complete_by, max_time, notify_url,
-- owner, extra): write a new job's record with the GET /jobs indexes, its history and the submission
-- counter of /metrics; a 'queued' job also gets its queue entry (LPUSH onto `queue`, its slot from the
-- `pushes` counter: QUEUE_KEY and QUEUE_PUSHES_KEY). A 'waiting' job (a pipeline step whose inputs are not
-- there yet) is in no queue: pipeline_step queues it once they are. extra: more field/value pairs.
-- jobstore.queue_entry() gives the same entry.
-- Names: index (JOBS_INDEX_KEY), by_type (JOBS_BY_TYPE_KEY), by_status (JOBS_BY_STATUS_KEY),
--        by_owner (JOBS_BY_OWNER_KEY), history_prefix/history_suffix (JOB_HISTORY_KEY),
--        jobs_total (JOBS_TOTAL_KEY)
local function new_job(queue, pushes, job_key, id, job_type, status, params, created, complete_by, max_time,
                       notify_url, owner, extra)
  local entry = '{"id":"' .. id .. '","type":"' .. job_type .. '"}'
  redis.call('HSET', job_key, 'id', id, 'type', job_type, 'status', status, 'params', params,
    'created_at', created, 'complete_by', complete_by, 'max_time', max_time, 'attempts', '0',
    'notify_url', notify_url, 'webhook_status', notify_url ~= '' and 'waiting' or 'none',
    'queue_entry', entry, 'owner', owner)
  if #extra > 0 then redis.call('HSET', job_key, unpack(extra)) end
  if status == 'queued' then
    redis.call('HSET', job_key, 'queue_slot', -redis.call('INCR', pushes))
    redis.call('LPUSH', queue, entry)
  end
  local now = tonumber(created)
  redis.call('ZADD', '${index}', now, id)
  redis.call('ZADD', '${by_type}' .. job_type, now, id)
  redis.call('ZADD', '${by_status}' .. status, now, id)
  if owner ~= '' then redis.call('ZADD', '${by_owner}' .. owner, now, id) end
  redis.call('RPUSH', '${history_prefix}' .. id .. '${history_suffix}', cjson.encode({status = status, at = now}))
  redis.call('HINCRBY', '${jobs_total}', job_type .. '|queued', 1)
end
