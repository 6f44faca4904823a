-- pipeline_changed(pipeline_key, pipeline_id): a pipeline or one of its steps changed: bump the pipeline's
-- `events` number and PUBLISH it on the pipeline's channel for /events listeners (nothing for a pipeline
-- record that no longer exists: no key is made).
-- Names: pipeline_channel (PIPELINE_EVENTS_CHANNEL)
local function pipeline_changed(pipeline_key, pipeline_id)
  if redis.call('EXISTS', pipeline_key) == 0 then return end
  redis.call('PUBLISH', '${pipeline_channel}' .. pipeline_id, redis.call('HINCRBY', pipeline_key, 'events', 1))
end
