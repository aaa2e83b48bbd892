-- topup.lua: credit an account once per idempotency key.
--
-- KEYS: 1 account hash   2 top-ups hash (idempotency key -> ledger entry id)   3 ledger stream
-- ARGV: 1 amount, nano-USD (positive integer)   2 idempotency key
-- Reply: {credited (1, or 0 when the key was seen before, or -1: no such account),
--         balance_nano after (string), ledger entry id}

local account_key, topups_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]
local amount, idempotency_key = ARGV[1], ARGV[2]

if redis.call('EXISTS', account_key) == 0 then return {-1, '0', ''} end
local seen = redis.call('HGET', topups_key, idempotency_key)
if seen then
  return {0, redis.call('HGET', account_key, 'balance_nano') or '0', seen}
end
local balance = redis.call('HINCRBY', account_key, 'balance_nano', amount)
redis.call('HINCRBY', account_key, 'topped_up_nano', amount)
local balance_text = string.format('%.0f', balance)
local entry = redis.call('XADD', ledger_key, '*', 'type', 'topup',
  'idempotency_key', idempotency_key, 'cost_nano', '0', 'amount_nano', amount,
  'balance_nano', balance_text)
redis.call('HSET', topups_key, idempotency_key, entry)
return {1, balance_text, entry}
