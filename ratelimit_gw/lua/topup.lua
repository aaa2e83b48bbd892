-- topup.lua: a top-up or a manual adjustment of an account's balance, once per idempotency key.
--
-- A top-up credits the balance and counts as topped up (the rpm policies read that). An
-- adjustment credits or debits the balance alone, its reason in its ledger entry; a debit
-- may not take the balance below the account's live holds (balance - held stays >= 0).
-- Both share one namespace of idempotency keys: the top-ups hash remembers each key with its
-- ledger entry, amount and type. The same key again with the same amount and type changes
-- nothing (a retry); with another amount or type it is a conflict and changes nothing either.
-- Records written before the amount was kept hold only the entry id: their amount is read
-- from that ledger entry (trimmed away: unknown, taken as a retry); a record without a type
-- is a top-up's. An account that does not exist (no created_ms: wiped, evicted, or a stub an
-- older build made) or was deleted gets nothing written.
--
-- KEYS: 1 account hash   2 top-ups hash (idempotency key -> "<entry id>|<amount>[|adjustment]")
--       3 ledger stream
-- ARGV: 1 amount, nano-USD (integer: positive for a top-up; non-zero for an adjustment)
--       2 idempotency key   3 type ("topup" | "adjustment")   4 reason (adjustments; "" none)
-- Reply: {status (1 applied; 0 the key was used before for this amount and type; -1 no such
--         account; -2 the key was used for another amount or type; -3 a debit below the live
--         holds; -4 the account is deleted), balance_nano after (string), ledger entry id,
--         the amount the key was first used for (nano-USD string; "" unknown; for -3 the
--         held nano-USD), the type it was first used for}

local account_key, topups_key, ledger_key = KEYS[1], KEYS[2], KEYS[3]
local amount, idempotency_key, entry_type, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local acct = redis.call('HMGET', account_key, 'created_ms', 'balance_nano', 'held_nano', 'status')
if not acct[1] then return {-1, '0', '', '', ''} end
if acct[4] == 'deleted' then return {-4, acct[2] or '0', '', '', ''} end

local seen = redis.call('HGET', topups_key, idempotency_key)
if seen then
  local entry, first_amount, first_type = seen, '', 'topup'
  local bar = string.find(seen, '|', 1, true)
  if bar then
    entry, first_amount = string.sub(seen, 1, bar - 1), string.sub(seen, bar + 1)
    local second = string.find(first_amount, '|', 1, true)
    if second then
      first_type = string.sub(first_amount, second + 1)
      first_amount = string.sub(first_amount, 1, second - 1)
    end
  else
    local rows = redis.call('XRANGE', ledger_key, entry, entry)
    if rows[1] then
      local fields = rows[1][2]
      for i = 1, #fields, 2 do
        if fields[i] == 'amount_nano' then first_amount = fields[i + 1] end
      end
    end
  end
  local status = 0
  if first_type ~= entry_type or (first_amount ~= '' and first_amount ~= amount) then
    status = -2
  end
  return {status, acct[2] or '0', entry, first_amount, first_type}
end

local adjustment = entry_type == 'adjustment'
if adjustment and tonumber(amount) < 0 then
  local balance, held = tonumber(acct[2] or '0'), tonumber(acct[3] or '0')
  if balance + tonumber(amount) < held then
    return {-3, acct[2] or '0', '', acct[3] or '0', ''}
  end
end

local balance = redis.call('HINCRBY', account_key, 'balance_nano', amount)
local record = amount
if adjustment then
  record = amount .. '|adjustment'
else
  redis.call('HINCRBY', account_key, 'topped_up_nano', amount)
end
local balance_text = string.format('%.0f', balance)
local fields = {'type', entry_type, 'idempotency_key', idempotency_key, 'cost_nano', '0',
  'amount_nano', amount, 'balance_nano', balance_text}
if reason ~= '' then
  fields[#fields + 1] = 'reason'
  fields[#fields + 1] = reason
end
local entry = redis.call('XADD', ledger_key, '*', unpack(fields))
redis.call('HSET', topups_key, idempotency_key, entry .. '|' .. record)
return {1, balance_text, entry, amount, entry_type}
