-- pipeline_step(job_key, id, new, now, ttl, Q, outbox): what a change of a pipeline step's status (new) does
-- to its pipeline, in the same script as the change (transition), so that a worker dying right after it
-- loses nothing. Nothing for a job outside a pipeline.
-- - running: the pipeline runs (it was queued).
-- - success: the steps that take this step's outputs get them (text is copied into their parameters; a
--   media file becomes the `ref` the graph holds, the stored result the worker reads directly); a step
--   whose inputs are now all there is queued at the end of the queue taken next (push_front: it waited
--   its turn once), preferring the node this step ran on (its `node_id`).
-- - failed or cancelled: every waiting step that depends on it, transitively, fails with an error naming
--   it (`upstream step "speech" failed: <its error>` or `... was cancelled`), its webhook queued.
-- When no step is left unfinished the pipeline finishes (finish_pipeline). The pipeline's graph (JSON):
-- {step: {job, type, needs: [{field, step, output, ref}]}}. Q as in queue_slots; outbox WEBHOOK_OUTBOX_KEY.
-- Names: job_prefix (JOB_KEY), pipeline_prefix (PIPELINE_KEY)
--! uses: job_changed, finish_job, queue_slots, finish_pipeline
local function pipeline_step(job_key, id, new, now, ttl, Q, outbox)
  local pid = redis.call('HGET', job_key, 'pipeline')
  if not pid or pid == '' then return end
  local pkey = '${pipeline_prefix}' .. pid
  if redis.call('EXISTS', pkey) == 0 then return end
  if new == 'running' then
    if redis.call('HGET', pkey, 'status') == 'queued' then
      redis.call('HSET', pkey, 'status', 'running', 'started_at', now)
    end
    return
  end
  local graph = cjson.decode(redis.call('HGET', pkey, 'graph'))
  local step = redis.call('HGET', job_key, 'step')
  local finished = 1
  if new == 'success' then
    local text = redis.call('HGET', job_key, 'text') or ''
    local node = redis.call('HGET', job_key, 'node_id') or ''
    for _, later in pairs(graph) do
      local later_key = '${job_prefix}' .. later.job
      for _, need in ipairs(later.needs) do
        if need.step == step and redis.call('HGET', later_key, 'status') == 'waiting' then
          local params = cjson.decode(redis.call('HGET', later_key, 'params'))
          if need.output == 'text' then params[need.field] = text else params[need.field] = need.ref end
          redis.call('HSET', later_key, 'params', cjson.encode(params))
          if redis.call('HINCRBY', later_key, 'waiting_for', -1) <= 0 then
            redis.call('HSET', later_key, 'status', 'queued', 'prefer_node', node)
            push_front(Q, later_key, later.job, redis.call('HGET', later_key, 'queue_entry'))
            job_changed(later_key, later.job, 'waiting', 'queued', now)
          end
        end
      end
    end
  else
    local reason
    if new == 'cancelled' then
      reason = 'upstream step "' .. step .. '" was cancelled'
      redis.call('HSETNX', pkey, 'error', 'step "' .. step .. '" was cancelled')
    else
      local error = redis.call('HGET', job_key, 'error') or 'failed'
      reason = 'upstream step "' .. step .. '" failed: ' .. error
      redis.call('HSETNX', pkey, 'error', 'step "' .. step .. '" failed: ' .. error)
    end
    local upstream = {step}
    while #upstream > 0 do
      local failed = table.remove(upstream)
      for name, later in pairs(graph) do
        local later_key = '${job_prefix}' .. later.job
        for _, need in ipairs(later.needs) do
          if need.step == failed and redis.call('HGET', later_key, 'status') == 'waiting' then
            redis.call('HSET', later_key, 'status', 'failed', 'error', reason)
            job_changed(later_key, later.job, 'waiting', 'failed', now)
            finish_job(later_key, later.job, 'failed', now, ttl, outbox,
                       '{"id":"' .. later.job .. '","status":"failed","error":' .. cjson.encode(reason) .. '}')
            finished = finished + 1
            table.insert(upstream, name)
          end
        end
      end
    end
  end
  if redis.call('HINCRBY', pkey, 'unfinished', -finished) <= 0 then
    finish_pipeline(pkey, pid, graph, now, ttl, outbox)
  end
end
