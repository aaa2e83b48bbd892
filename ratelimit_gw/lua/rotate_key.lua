-- rotate_key.lua: make a new secret the key's current one; the old one retires with a grace.
--
-- The key hash names its current secret by hash (secret_sha256) and each retired secret
-- still in its grace by a field retired:<sha256> = the grace's end (Redis ms). A key issued
-- before secrets were recorded has no secret_sha256: its secret retires as retired:legacy.
-- Retired secrets past their grace are dropped here. The caller points the new secret's
-- index entry at the key and makes the old one's expire at the grace's end (now: deleted).
--
-- KEYS: 1 key hash
-- ARGV: 1 new secret's sha256 (hex)   2 its listed prefix   3 grace, ms (integer >= 0)
-- Reply: {status (1 rotated; -1 no such key; -2 the key is revoked),
--         the old secret's sha256 ("" for a legacy key), grace end (Redis ms, integer)}

local key_hash = KEYS[1]
local key = redis.call('HMGET', key_hash, 'created_ms', 'revoked', 'secret_sha256')
if not key[1] then return {-1, '', 0} end
if key[2] == '1' then return {-2, '', 0} end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grace_end = now_ms + tonumber(ARGV[3])

local fields = redis.call('HGETALL', key_hash)
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 8) == 'retired:' and tonumber(fields[i + 1]) <= now_ms then
    redis.call('HDEL', key_hash, fields[i])
  end
end
if grace_end > now_ms then
  redis.call('HSET', key_hash, 'retired:' .. (key[3] or 'legacy'), grace_end)
end
redis.call('HSET', key_hash, 'secret_sha256', ARGV[1], 'prefix', ARGV[2], 'rotated_ms', now_ms)
return {1, key[3] or '', grace_end}
