-- owned_by(job_key, worker, attempt): whether the job runs on `worker` in the attempt `attempt` (the
-- number its claim produced): status running, and the record's worker and attempts are these. A worker
-- whose job the sweep gave back to the queue, or that another worker (or a later attempt) runs now, no
-- longer owns it: the changes it makes to the job are refused.
-- Names: none
local function owned_by(job_key, worker, attempt)
  local record = redis.call('HMGET', job_key, 'status', 'worker', 'attempts')
  return record[1] == 'running' and record[2] == worker and tonumber(record[3]) == tonumber(attempt)
end
