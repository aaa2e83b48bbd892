-- account_status.lua: disable or enable an account.
--
-- A disabled account keeps everything (balance, keys, ledger) but admit.lua refuses its keys
-- on their next request, on every gateway. A deleted account (delete_account.lua) is never
-- enabled again, and an account that does not exist is not created as a stub.
--
-- KEYS: 1 account hash
-- ARGV: 1 the status to set: "disabled", or "" (enabled: the field removed)
-- Reply: 1 changed, 0 it already had that status, -1 no such account, -2 the account is deleted

local acct = redis.call('HMGET', KEYS[1], 'created_ms', 'status')
if not acct[1] then return -1 end
if acct[2] == 'deleted' then return -2 end
if (acct[2] or '') == ARGV[1] then return 0 end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'status')
else
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
end
return 1
