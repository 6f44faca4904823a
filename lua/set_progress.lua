-- set_progress: record a running job's percentage (only while it runs, and only a change). With a
-- worker, only while the job runs on that worker in that attempt: a worker that lost the job changes
-- nothing.
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] percent  [2] job id  [3] worker ('' = any)  [4] its attempt (with ARGV[3])
-- Returns: 0
-- Names: none
--! uses: job_changed, owned_by
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if ARGV[3] ~= '' and not owned_by(KEYS[1], ARGV[3], ARGV[4]) then return 0 end
if redis.call('HGET', KEYS[1], 'progress') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  job_changed(KEYS[1], ARGV[2], 'running', 'running', '0')
end
return 0
