-- set_phase: record what a running job is doing now and since when (only while it runs, and only a
-- change). A new phase drops the percentage, which belonged to the phase it was measured in. With a
-- worker, only while the job runs on that worker in that attempt: a worker that lost the job changes
-- nothing.
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] phase  [2] now  [3] job id  [4] worker ('' = any)  [5] its attempt (with ARGV[4])
-- Returns: 0
-- Names: none
--! uses: job_changed, owned_by
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[4] ~= '' and not owned_by(KEYS[1], ARGV[4], ARGV[5]) then return 0 end
if redis.call('HGET', KEYS[1], 'phase') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'phase', ARGV[1], 'phase_since', ARGV[2])
  redis.call('HDEL', KEYS[1], 'progress')
  job_changed(KEYS[1], ARGV[3], 'running', 'running', '0')
end
return 0
