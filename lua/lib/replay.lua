-- replay(idempotency_key): the idempotency record stored under the key (JSON with job_id or pipeline_id,
-- and request_hash) when what it names still exists, else nil: a key whose job or pipeline has expired
-- (RESULT_TTL, which may be shorter than the key's 24 h) is unused again.
-- Names: job_prefix (JOB_KEY), pipeline_prefix (PIPELINE_KEY)
local function replay(idempotency_key)
  local seen = redis.call('GET', idempotency_key)
  if not seen then return nil end
  local record = cjson.decode(seen)
  local key
  if record.pipeline_id then key = '${pipeline_prefix}' .. record.pipeline_id
  else key = '${job_prefix}' .. tostring(record.job_id) end
  if redis.call('EXISTS', key) == 1 then return seen end
  return nil
end
