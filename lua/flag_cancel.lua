-- flag_cancel: ask the worker running a job to stop it (the cancel of a running job), unless the
-- job's status changed since the caller read it.
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] the status the caller read (running)
-- Returns: 1 when the flag was set, 0 when the status is no longer ARGV[1].
-- Names: none
if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 1
end
return 0
