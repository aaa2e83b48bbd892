-- webhook_raise.lua: put one event delivery in the outbox, once per delivery id.
--
-- Several instances may see the same crossing, and a scan raises the same event again at
-- each turn: the marker (SET NX) makes every raise after the first a no-op, and it outlives
-- the delivery so a later raise of a delivered event is still one.
--
-- KEYS (one hash tag, {wh}):
--   1 the delivery's dedupe marker   2 outbox zset (delivery id -> due ms)   3 records hash
-- ARGV:
--   1 delivery id   2 the record (JSON)   3 the marker's lifetime, ms
-- Reply: 1 when added now, 0 when it was raised before.

local delivery_id, record, marker_ms = ARGV[1], ARGV[2], ARGV[3]
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', marker_ms) then
  return 0
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[3], delivery_id, record)
redis.call('ZADD', KEYS[2], now_ms, delivery_id)
return 1
