-- set_progress: record a running job's percentage (only while it runs, and only a change).
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] percent  [2] job id
-- Returns: 0
-- Names: none
--! uses: job_changed
if redis.call('HGET', KEYS[1], 'status') == 'running' and redis.call('HGET', KEYS[1], 'progress') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  job_changed(KEYS[1], ARGV[2], 'running', 'running', '0')
end
return 0
