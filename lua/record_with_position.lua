-- record_with_position: a job's record and, when it is queued, its queue position: /status in one round trip.
--
-- KEYS: [1] job hash (JOB_KEY)  [2] queue (QUEUE_KEY)  [3] pushes (QUEUE_PUSHES_KEY)
--       [4] requeued (QUEUE_REQUEUED_KEY)  [5] cancelled (QUEUE_CANCELLED_KEY)
-- ARGV: [1] job id
-- Returns: the record's field/value pairs (empty when there is none), for a queued job followed by
--          'queue_position', position ('' when its entry is no longer in the queue).
-- Names: none
--! uses: position_of
local flat = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
if record['status'] == 'queued' then
  local position = position_of({KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[1], 'queued', record['queue_slot'],
    record['queue_entry'])
  table.insert(flat, 'queue_position')
  table.insert(flat, position and tostring(position) or '')
end
return flat
