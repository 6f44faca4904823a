-- finish_pipeline(pipeline_key, pipeline_id, graph, now, ttl, outbox): a pipeline whose last step has just
-- finished finishes: success when every step succeeded, cancelled when it was cancelled by request
-- (POST /pipelines/<id>/cancel), failed otherwise. The pipeline and every step's record and history then
-- expire together, ttl seconds from now (RESULT_TTL); its index entries past retention are trimmed; its one
-- final webhook (with each step's result, as the step's own webhook gives it) is queued in the outbox
-- (WEBHOOK_OUTBOX_KEY) when it has a notify_url: webhook-id is the pipeline id, and the delivery state is
-- kept on the pipeline record (the entry's `record`), with the body (`webhook_body`: a resend sends it again,
-- POST /pipelines/<id>/webhook).
-- Names: job_prefix (JOB_KEY), history_prefix/history_suffix (JOB_HISTORY_KEY), horizon (INDEX_HORIZON_S),
--        pipelines_index (PIPELINES_INDEX_KEY), pipelines_by_owner (PIPELINES_BY_OWNER_KEY)
--! uses: pipeline_changed
local function finish_pipeline(pipeline_key, pipeline_id, graph, now, ttl, outbox)
  local steps = {}
  local all_succeeded = true
  for name, step in pairs(graph) do
    local key = '${job_prefix}' .. step.job
    local record = redis.call('HMGET', key, 'status', 'result_url', 'text', 'error')
    local result = {id = step.job}
    if record[1] == 'success' then
      result.status = 'success'
      if record[2] and record[2] ~= '' then result.result_url = record[2] else result.text = record[3] or '' end
    else
      all_succeeded = false
      result.status = 'failed'  -- as a job's own webhook says it: a cancel is a failure with its reason
      result.error = record[4] or record[1] or 'expired'
    end
    steps[name] = result
    redis.call('EXPIRE', key, tonumber(ttl))
    redis.call('EXPIRE', '${history_prefix}' .. step.job .. '${history_suffix}', tonumber(ttl))
  end
  local status = 'failed'
  if all_succeeded then status = 'success'
  elseif redis.call('HGET', pipeline_key, 'cancel_requested') == '1' then status = 'cancelled' end
  if status == 'cancelled' then redis.call('HSET', pipeline_key, 'error', 'cancelled by request') end
  redis.call('HSET', pipeline_key, 'status', status, 'finished_at', now)
  redis.call('EXPIRE', pipeline_key, tonumber(ttl))
  local horizon = tonumber(now) - tonumber(ttl) - ${horizon}
  redis.call('ZREMRANGEBYSCORE', '${pipelines_index}', '-inf', horizon)
  local owner = redis.call('HGET', pipeline_key, 'owner') or ''
  if owner ~= '' then redis.call('ZREMRANGEBYSCORE', '${pipelines_by_owner}' .. owner, '-inf', horizon) end
  local url = redis.call('HGET', pipeline_key, 'notify_url')
  if url and url ~= '' then
    local body = {id = pipeline_id, status = status == 'success' and 'success' or 'failed', steps = steps}
    if status ~= 'success' then body.error = redis.call('HGET', pipeline_key, 'error') or status end
    local encoded = cjson.encode(body)
    redis.call('HSET', pipeline_key, 'webhook_status', 'pending', 'webhook_attempts', 0, 'webhook_body', encoded)
    redis.call('LPUSH', outbox, cjson.encode({job_id = pipeline_id, url = url, body = encoded,
                                              attempt = 0, record = pipeline_key}))
  end
  pipeline_changed(pipeline_key, pipeline_id)
end
