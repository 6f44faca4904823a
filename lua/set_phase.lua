-- set_phase: record what a running job is doing now and since when (only while it runs, and only a
-- change). A new phase drops the percentage, which belonged to the phase it was measured in.
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] phase  [2] now  [3] job id
-- Returns: 0
-- Names: none
--! uses: job_changed
if redis.call('HGET', KEYS[1], 'status') == 'running' and redis.call('HGET', KEYS[1], 'phase') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'phase', ARGV[1], 'phase_since', ARGV[2])
  redis.call('HDEL', KEYS[1], 'progress')
  job_changed(KEYS[1], ARGV[3], 'running', 'running', '0')
end
return 0
