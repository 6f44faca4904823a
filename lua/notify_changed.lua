-- notify_changed: tell /events listeners that a job record changed outside the other scripts.
--
-- KEYS: [1] job hash (JOB_KEY)
-- ARGV: [1] job id
-- Returns: 0 (nothing is published for a record that does not exist)
-- Names: none
--! uses: job_changed
if redis.call('EXISTS', KEYS[1]) == 1 then
  job_changed(KEYS[1], ARGV[1], 'same', 'same', '0')
end
return 0
