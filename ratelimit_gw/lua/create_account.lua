-- create_account.lua: create an account hash only if it does not exist yet.
--
-- An account exists when its hash has created_ms. A hash without it is a stub (an older
-- build's settlement wrote to a wiped account): it reads as no account, so it is removed
-- and the account created in its place. A deleted account's hash stays as its tombstone
-- (delete_account.lua): its id is never created again.
--
-- KEYS: 1 account hash
-- ARGV: field/value pairs to store (created_ms among them)
-- Reply: 1 created, 0 the account already exists, -1 the id belonged to a deleted account.

local existing = redis.call('HMGET', KEYS[1], 'created_ms', 'status')
if existing[1] then
  if existing[2] == 'deleted' then return -1 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
