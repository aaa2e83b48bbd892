-- settle.lua: finish one admitted request exactly once.
--
-- Releases its hold and concurrency leases, corrects every tpm bucket from the estimate
-- charged at admission to the real usage (a refund, or an extra debit that may take a
-- bucket below zero, from which it refills), charges the real cost and appends one ledger
-- entry. A request id already settled changes nothing (a retried settlement never charges
-- twice). A hold that already expired was released by admit.lua; the cost is still charged.
--
-- Outcome "abandoned" releases an admission whose caller will never settle it (the client
-- hung up while it ran, or storage failed after it was sent). The settled zset is the
-- tombstone admit.lua checks, so such a release wins even if it reaches Redis before its
-- admission. Without a hold record (not admitted yet, refused, or swept by its TTL) nothing
-- was consumed: it writes the tombstone and nothing else. With one it releases what the
-- admission placed, refunds the tpm estimate and writes a `release` entry.
--
-- A hold record that names per-model tpm buckets ("#<hash>=<tpm limit>", admit.lua) has
-- them corrected like the scopes' tpm buckets.
--
-- A hold record that names budget spend hashes (admit.lua) corrects them: its hold is
-- released from held_nano and its cost added to spent_nano of the period it was admitted in,
-- even once that period is over. (The hashes share the account's hash tag: one slot.)
--
-- An account that does not exist (no created_ms: wiped, evicted, or a stub an older build
-- made) is not re-created: nothing at all is written, and the reply says so.
--
-- KEYS (admit.lua's, in its order; one hash tag):
--   1 account hash (with the account's buckets)   2 key hash (with the key's buckets)
--   3 key leases   4 in-flight zset (also the account's leases)   5 holds hash
--   6 ledger stream   7 settled zset (request_id -> settle time ms; older than an hour trimmed)
-- ARGV:
--   1 request_id   2 key_id   3 estimated tokens charged at admission   4 actual tokens
--   5 cost, nano-USD (integer)   6 model   7 input tokens   8 output tokens
--   9 outcome ("ok", "upstream_error", "client_disconnect", "abandoned", ...)
--  10 the request id the caller saw (x-request-id), written as the entry's request_id; empty
--     = ARGV[1]. ARGV[1] itself, the gateway's own unique id, is the entry's settlement_id and
--     the only id deduplication uses, so a client reusing its x-request-id is charged each time.
--  11 cache read tokens   12 cache write tokens (in the ledger entry unless 0)
-- Reply: {settled (1; 0 for a duplicate; -1: no such account, nothing written),
--         overrun (1 if the balance went below zero), balance_nano after (string),
--         hold released, nano-USD (string)}

local account_key = KEYS[1]
local request_id, key_id = ARGV[1], ARGV[2]
local estimated_tokens, actual_tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local cost_nano = ARGV[5]
local abandoned = ARGV[9] == 'abandoned'
-- A repeat can only come from the gateway's own retries, which end ~32 s after the response
-- (settler.py): an hour is a wide margin, and bounds the zset of a busy account to an hour
-- of its request ids (a day at 100 req/s would be 8.6 million entries).
local SETTLED_RETENTION_MS = 3600000

-- Writing to a missing account would re-create it as a stub that reads as no account at all.
local acct = redis.call('HMGET', account_key,
  'created_ms', 'prepaid', 'balance_nano', 'tpm', 'tpm_level', 'tpm_ts')
if not acct[1] then return {-1, 0, '0', '0'} end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Mark it settled and learn whether it already was, in one call.
if redis.call('ZADD', KEYS[7], 'NX', now_ms, request_id) == 0 then
  return {0, 0, acct[3] or '0', '0'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now_ms - SETTLED_RETENTION_MS)

local released = '0'
local model_buckets = {}  -- {hash, tpm limit} of each per-model bucket its admission charged
local record = redis.call('HGET', KEYS[5], request_id)
if record then
  local held, estimate = string.match(record, '^[^|]*|(%d+)|(%d+)|')
  released = held
  estimated_tokens = tonumber(estimate)
  -- Integers go to HINCRBY as strings: Lua would print large numbers as 1e+15.
  if held ~= '0' then redis.call('HINCRBY', account_key, 'held_nano', '-' .. held) end
  local spends = string.match(record, '^[^|]*|%d+|%d+|[^|]*|([^#]*)')
  for bucket, capacity in string.gmatch(record, '#([^#=]+)=(%d+)') do
    model_buckets[#model_buckets + 1] = {bucket, capacity}
  end
  if spends then
    for spend in string.gmatch(spends, '[^|]+') do
      if held ~= '0' then redis.call('HINCRBY', spend, 'held_nano', '-' .. held) end
      if cost_nano ~= '0' then redis.call('HINCRBY', spend, 'spent_nano', cost_nano) end
    end
  end
  redis.call('HDEL', KEYS[5], request_id)
elseif abandoned then
  -- Nothing of it is here to give back: the tombstone above is all a late admission needs.
  return {1, 0, acct[3] or '0', '0'}
end
redis.call('ZREM', KEYS[4], request_id)
redis.call('ZREM', KEYS[3], request_id)

-- Correct the token buckets to what was really used.
local delta = estimated_tokens - actual_tokens
if delta ~= 0 then
  local key = redis.call('HMGET', KEYS[2], 'tpm', 'tpm_level', 'tpm_ts')
  local scopes = {{account_key, acct[4], acct[5], acct[6]}, {KEYS[2], key[1], key[2], key[3]}}
  for _, m in ipairs(model_buckets) do
    local s = redis.call('HMGET', m[1], 'tpm_level', 'tpm_ts')
    scopes[#scopes + 1] = {m[1], m[2], s[1], s[2], true}
  end
  for _, b in ipairs(scopes) do
    local capacity = tonumber(b[2])
    if capacity then
      local level = capacity
      if b[3] and b[4] then
        local elapsed = math.max(now_ms - tonumber(b[4]), 0)
        level = math.min(capacity, tonumber(b[3]) + elapsed * capacity / 60000)
      end
      level = math.min(capacity, level + delta)
      redis.call('HSET', b[1], 'tpm_level', tostring(level), 'tpm_ts', now_ms)
      if b[5] then
        -- A per-model bucket's hash lives until it would be full again (its rpm bucket too).
        local pttl = redis.call('PTTL', b[1])
        local full_ms = math.ceil((capacity - level) * 60000 / capacity) + 1000
        if pttl < full_ms then redis.call('PEXPIRE', b[1], full_ms) end
      end
    end
  end
end

local prepaid = acct[2] == '1'
local balance = tonumber(acct[3] or '0')
if cost_nano ~= '0' then
  if prepaid then
    balance = redis.call('HINCRBY', account_key, 'balance_nano', '-' .. cost_nano)
  end
  redis.call('HINCRBY', account_key, 'spent_nano', cost_nano)
end

local balance_text = string.format('%.0f', balance)
local entry_type = 'charge'
if tonumber(cost_nano) == 0 then entry_type = 'release' end
local shown_id = request_id
if ARGV[10] and ARGV[10] ~= '' then shown_id = ARGV[10] end
local entry = {'type', entry_type, 'request_id', shown_id, 'settlement_id', request_id,
  'key_id', key_id, 'model', ARGV[6], 'input_tokens', ARGV[7], 'output_tokens', ARGV[8],
  'cost_nano', cost_nano, 'balance_nano', balance_text, 'outcome', ARGV[9]}
-- Most entries have no cached tokens: leave the fields out (~20 bytes an entry).
if ARGV[11] ~= '0' then
  entry[#entry + 1] = 'cache_read_tokens'
  entry[#entry + 1] = ARGV[11]
end
if ARGV[12] ~= '0' then
  entry[#entry + 1] = 'cache_write_tokens'
  entry[#entry + 1] = ARGV[12]
end
redis.call('XADD', KEYS[6], '*', unpack(entry))

local overrun = 0
if prepaid and balance < 0 then
  -- Only an upstream that ignored the output cap gets here (holds cover the worst case).
  overrun = 1
  redis.call('HINCRBY', account_key, 'overruns', 1)
  redis.call('XADD', KEYS[6], '*', 'type', 'overrun', 'request_id', request_id,
    'key_id', key_id, 'cost_nano', '0', 'balance_nano', balance_text)
end
return {1, overrun, balance_text, released}
