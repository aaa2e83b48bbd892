-- topup.lua: credit an account once per idempotency key.
--
-- The top-ups hash remembers each key with its ledger entry and amount. The same key again
-- with the same amount credits nothing (a retry); with another amount it is a conflict and
-- credits nothing either. Records written before the amount was kept hold only the entry id:
-- their amount is read from that ledger entry (trimmed away: unknown, taken as a retry).
-- An account that does not exist (no created_ms: wiped, evicted, or a stub an older build
-- made) gets nothing written.
--
-- KEYS: 1 account hash   2 top-ups hash (idempotency key -> "<ledger entry id>|<amount>")
--       3 ledger stream
-- ARGV: 1 amount, nano-USD (positive integer)   2 idempotency key
-- Reply: {credited (1; 0 the key was used for this amount before; -1 no such account;
--         -2 the key was used for another amount), balance_nano after (string),
--         ledger entry id, the amount the key was first used for (nano-USD string; "" unknown)}

local account_key, topups_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]
local amount, idempotency_key = ARGV[1], ARGV[2]

local acct = redis.call('HMGET', account_key, 'created_ms', 'balance_nano')
if not acct[1] then return {-1, '0', '', ''} end

local seen = redis.call('HGET', topups_key, idempotency_key)
if seen then
  local entry, first_amount = seen, ''
  local bar = string.find(seen, '|', 1, true)
  if bar then
    entry, first_amount = string.sub(seen, 1, bar - 1), string.sub(seen, bar + 1)
  else
    local rows = redis.call('XRANGE', ledger_key, entry, entry)
    if rows[1] then
      local fields = rows[1][2]
      for i = 1, #fields, 2 do
        if fields[i] == 'amount_nano' then first_amount = fields[i + 1] end
      end
    end
  end
  local credited = 0
  if first_amount ~= '' and first_amount ~= amount then credited = -2 end
  return {credited, acct[2] or '0', entry, first_amount}
end

local balance = redis.call('HINCRBY', account_key, 'balance_nano', amount)
redis.call('HINCRBY', account_key, 'topped_up_nano', amount)
local balance_text = string.format('%.0f', balance)
local entry = redis.call('XADD', ledger_key, '*', 'type', 'topup',
  'idempotency_key', idempotency_key, 'cost_nano', '0', 'amount_nano', amount,
  'balance_nano', balance_text)
redis.call('HSET', topups_key, idempotency_key, entry .. '|' .. amount)
return {1, balance_text, entry, amount}
