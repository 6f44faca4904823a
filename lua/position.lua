-- position: the queue position of one job (what jobstore.queue_position() and a page of GET /jobs read).
--
-- KEYS: [1] job hash (JOB_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] requeued (QUEUE_REQUEUED_KEY)  [5] cancelled (QUEUE_CANCELLED_KEY)
-- ARGV: [1] job id
-- Returns: 1 for the job that runs next; nil when the job is not queued or its entry is no longer in the queue.
-- Names: none
--! uses: position_of
local record = redis.call('HMGET', KEYS[1], 'status', 'queue_slot', 'queue_entry')
return position_of({KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[1], record[1], record[2], record[3])
