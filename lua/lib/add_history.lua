-- add_history(key, event, cap): append one event (a Lua table) to the job's webhook_history field,
-- a JSON list, dropping the oldest past cap (WEBHOOK_HISTORY_MAX, passed in by the caller).
-- Names: none
local function add_history(key, event, cap)
  local raw = redis.call('HGET', key, 'webhook_history')
  local history = {}
  if raw and raw ~= '' then history = cjson.decode(raw) end
  table.insert(history, event)
  while #history > cap do table.remove(history, 1) end
  redis.call('HSET', key, 'webhook_history', cjson.encode(history))
end
