-- create_account.lua: create an account hash only if it does not exist yet.
--
-- An account exists when its hash has created_ms. A hash without it is a stub (an older
-- build's settlement wrote to a wiped account): it reads as no account, so it is removed
-- and the account created in its place.
--
-- KEYS: 1 account hash
-- ARGV: field/value pairs to store (created_ms among them)
-- Reply: 1 created, 0 the account already exists.

if redis.call('HEXISTS', KEYS[1], 'created_ms') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
