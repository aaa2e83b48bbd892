-- webhook_claim.lua: claim the outbox's due deliveries for one deliverer.
--
-- A claim moves an event's due time to the lease's end: no other instance takes it before
-- then, and if its deliverer dies the event is due again when the lease lapses. The
-- deliverer then removes it (delivered, dropped) or sets its next attempt (ZADD XX).
--
-- KEYS (one hash tag, {wh}): 1 outbox zset (delivery id -> due ms)   2 records hash
-- ARGV: 1 how many to claim at most   2 lease, ms
-- Reply: {now_ms (string), delivery id 1, record 1, delivery id 2, record 2, ...}; a
--        delivery id without a record (a half-removed one) is removed, not returned.

local limit, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)
local reply = {tostring(now_ms)}
for _, delivery_id in ipairs(due) do
  local record = redis.call('HGET', KEYS[2], delivery_id)
  if record then
    redis.call('ZADD', KEYS[1], now_ms + lease_ms, delivery_id)
    reply[#reply + 1] = delivery_id
    reply[#reply + 1] = record
  else
    redis.call('ZREM', KEYS[1], delivery_id)
  end
end
return reply
