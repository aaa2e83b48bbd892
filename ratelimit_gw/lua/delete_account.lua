-- delete_account.lua: delete an account, keeping its hash as a tombstone and its ledger.
--
-- Refused, writing nothing, while the account has a balance (above or below zero) or live
-- holds (requests in flight), unless forced. A forced delete of a non-zero balance appends a
-- `forfeit` ledger entry (amount: minus the balance, so the balance after is 0).
-- Deleting sets status = deleted: admit.lua then refuses every key of the account as revoked,
-- and create_account.lua refuses its id for ever. The balance becomes 0 and the account
-- postpaid, so the requests still in flight settle as charges in the ledger without taking a
-- balance below zero. The caller revokes the keys and drops the id from the account list.
--
-- KEYS: 1 account hash   2 holds hash   3 ledger stream
-- ARGV: 1 force ("1" | "0")
-- Reply: {status (1 deleted; 0 refused: a balance or holds remain; -1 no such account;
--         -2 already deleted), balance_nano before (string), held_nano (string),
--         live holds (integer)}

local account_key, holds_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]
local acct = redis.call('HMGET', account_key, 'created_ms', 'status', 'balance_nano', 'held_nano')
if not acct[1] then return {-1, '0', '0', 0} end
local balance, held = acct[3] or '0', acct[4] or '0'
local holds = redis.call('HLEN', holds_key)
if acct[2] == 'deleted' then return {-2, balance, held, holds} end
if ARGV[1] ~= '1' and (balance ~= '0' or holds > 0) then return {0, balance, held, holds} end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if balance ~= '0' then
  local forfeited = '-' .. balance
  if string.sub(balance, 1, 1) == '-' then forfeited = string.sub(balance, 2) end
  redis.call('XADD', ledger_key, '*', 'type', 'forfeit', 'cost_nano', '0',
    'amount_nano', forfeited, 'balance_nano', '0', 'reason', 'account deleted',
    'deleted_ms', now_ms)
end
redis.call('HSET', account_key, 'status', 'deleted', 'deleted_ms', now_ms, 'balance_nano', 0,
  'prepaid', '0')
return {1, balance, held, holds}
