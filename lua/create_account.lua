-- create_account.lua: create an account hash only if it does not exist yet.
--
-- KEYS: 1 account hash
-- ARGV: field/value pairs to store
-- Reply: 1 created, 0 the account already exists.

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
