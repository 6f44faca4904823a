-- position_of(Q, id, status, slot, entry): the queue position of a job from its record's status,
-- queue_slot and queue_entry: 1 for the job that runs next, nil when it is not queued or its entry
-- is no longer in the queue. Counts slots and the tombstones among them; only a record from
-- before queue slots (no slot) is looked up in the list (LPOS, O(N)).
-- Q as in queue_slots.
-- Names: none
--! uses: queue_slots
local function position_of(Q, id, status, slot, entry)
  if status ~= 'queued' then return nil end
  slot = tonumber(slot or '')
  if slot == nil then
    local index = redis.call('LPOS', Q[1], entry or '', 'RANK', -1)
    if not index then return nil end
    return redis.call('LLEN', Q[1]) - index
  end
  local right = queue_right(Q)
  if not in_queue(Q, id, slot, right) then return nil end
  return right - slot + 1 - redis.call('ZCOUNT', Q[4], slot + 1, right)
end
