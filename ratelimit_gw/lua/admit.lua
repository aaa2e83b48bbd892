-- admit.lua: decide and consume, in one atomic step, everything one request needs.
--
-- Checks the key (exists, not revoked, not expired) and its account (exists; not disabled:
-- reason "account_disabled"; not deleted: its keys read as revoked), releases holds whose
-- TTL passed (a gateway died mid-request), then tests every limit of every scope and the
-- account's balance. Only when all pass does it consume: one request from each rpm bucket,
-- the token estimate from each tpm bucket, a concurrency lease per scope, and a balance hold.
-- A rejected request writes nothing but the expired-hold sweep. Mode "peek" computes the
-- same state and writes nothing at all (headers for requests rejected before admission).
-- A request id already in the settled zset was released before this admission ran (its
-- caller gave up on it: settle.lua, outcome "abandoned"): refused, reason "abandoned",
-- writing nothing at all.
--
-- Budgets (budgets.py, docs/limits-and-balance.md): a scope's hash may carry budget_nano and
-- budget_period (the account's also timezone); their "shape" is "<timezone>|<account
-- period>|<key period>" ("" when neither has a budget). The gateway passes the shape it
-- believes and the bounds it computed for each period; a shape that differs, or bounds that
-- do not hold this script's TIME, are refused as "budget_period_stale" (writing nothing; the
-- reply carries the real shape and TIME, and the gateway recomputes). The worst-case hold
-- counts against each budget's spend hash (spent_nano + held_nano) like the balance's; an
-- admitted request adds it to held_nano, and its hold record names the spend hashes, so its
-- settlement corrects the period it was admitted in. No budget: no key, no call.
--
-- Per-model limits (model_limits.py): a scope's hash may carry model_limits (canonical JSON of
-- pattern -> {rpm, tpm}); their "shape" is "<account's>\n<key's>" ("" when neither has any).
-- The gateway matches the model against the patterns (Python's fnmatchcase) and passes the
-- shape it believes with one bucket per matching pattern; a shape that differs is refused as
-- "model_limits_stale" (writing nothing; the reply carries the real shape). Each bucket is a
-- hash of its own (rpm_level, rpm_ts, tpm_level, tpm_ts, like a scope's), checked and
-- consumed with the others, all or nothing; it expires once it would be full again. An
-- admitted request's hold record names the ones with a tpm limit, so settle.lua corrects them.
-- No per-model limits: no key, no argument, no call.
--
-- KEYS (all under the account's hash tag, so one cluster slot):
--   1 account hash   2 key hash   3 key leases (zset request_id -> expiry ms)
--   4 in-flight zset (request_id -> hold and lease expiry ms; the account's leases)
--   5 holds hash (request_id -> record)   6 ledger stream
--   7 settled zset (request_id -> settle time ms; settle.lua's)
--   8.. the spend hash of each budget of the shape ARGV 7 names: the account's, then the key's
--   then, from index ARGV 13, the bucket hash of each matching model pattern (ARGV 14..)
-- ARGV:
--   1 mode ("admit" | "peek")   2 request_id   3 key_id
--   4 estimated tokens (integer)   5 hold, nano-USD (integer)   6 lease/hold TTL, ms
--   7 the budget shape the gateway believes ("" or absent: none)
--   8, 9 the account budget's period [start, end) in ms   10, 11 the key budget's (0: none)
--   12 the model shape the gateway believes ("" or absent: none)   13 the index in KEYS of
--   the first model bucket   14.. per matching pattern: scope ("account" | "key"), pattern,
--   rpm, tpm ("" when the pattern has none)
-- Reply (fixed shape; integers, -1 = no such limit):
--   {allowed, reason, retry_after_ms, hit_limit,
--    rpm_limit, rpm_remaining, rpm_reset_ms, tpm_limit, tpm_remaining, tpm_reset_ms,
--    concurrency_limit, concurrency_in_use, available_nano (string, "" if not prepaid),
--    holds_expired, account_rpm,
--    budget shape (string), now_ms, budget scope ("account" | "key"; "" unless refused for a
--    budget), its cap and its spend + holds, nano-USD (strings), its period's end ms,
--    model shape (string), the scope and pattern of the model limit that refused it ("")}
-- A holds-hash record is "key_id|hold|estimate|expiry ms", then, with a budget,
-- "|account spend hash|key spend hash" (either may be empty), then, with per-model tpm limits,
-- "#<bucket hash>=<tpm limit>" for each.
-- Buckets live in the hash of their scope (account or key), as fields <kind>_level (a float
-- of units) and <kind>_ts (the Redis time in ms of the last update), kind = rpm or tpm: the
-- hashes are read anyway, so a bucket costs no call of its own. A missing level is a full
-- bucket. A limit of N per minute holds N and refills N/60000 per ms.

local account_key, key_key = KEYS[1], KEYS[2]
local mode, request_id, key_id = ARGV[1], ARGV[2], ARGV[3]
local estimated_tokens = tonumber(ARGV[4])
local hold_nano = tonumber(ARGV[5])
local ttl_ms = tonumber(ARGV[6])
local writing = mode == 'admit'
local MAX_SWEEP = 25
-- A spend hash outlives its period by the hold's TTL and this (budgets.SPEND_MARGIN_MS).
local SPEND_MARGIN_MS = 3600000

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function reply_rejected(reason)
  return {0, reason, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, '', 0, -1, '', now_ms, '', '', '', 0,
    '', '', ''}
end

if writing and redis.call('ZSCORE', KEYS[7], request_id) then
  return reply_rejected('abandoned')
end

local key = redis.call('HMGET', key_key, 'created_ms', 'revoked', 'expires_ms', 'rpm', 'tpm',
  'concurrency', 'rpm_level', 'rpm_ts', 'tpm_level', 'tpm_ts', 'budget_nano', 'budget_period',
  'model_limits')
if not key[1] then return reply_rejected('invalid_key') end
if key[2] == '1' then return reply_rejected('key_revoked') end
if key[3] and tonumber(key[3]) <= now_ms then return reply_rejected('key_expired') end

local acct = redis.call('HMGET', account_key, 'created_ms', 'rpm', 'tpm', 'concurrency',
  'rpm_policy', 'rpm_override', 'balance_nano', 'held_nano', 'topped_up_nano', 'prepaid',
  'rpm_level', 'rpm_ts', 'tpm_level', 'tpm_ts', 'status', 'budget_nano', 'budget_period',
  'timezone', 'model_limits')
if not acct[1] then return reply_rejected('invalid_key') end
-- status is absent on an active account (account_status.lua, delete_account.lua).
if acct[15] then
  return reply_rejected(acct[15] == 'disabled' and 'account_disabled' or 'key_revoked')
end

-- The budgets in force, each {scope, cap, spend hash, period start, period end}.
local account_period = acct[16] and acct[17]
local key_period = key[11] and key[12]
local budget_shape = ''
local budgets = {}
local model_shape = ''
if acct[19] or key[13] then model_shape = (acct[19] or '') .. '\n' .. (key[13] or '') end
if account_period or key_period then
  budget_shape = (acct[18] or '') .. '|' .. (account_period or '') .. '|' .. (key_period or '')
end
if writing and budget_shape ~= '' then
  local stale = (ARGV[7] or '') ~= budget_shape
  local next_key = 8
  if account_period then
    budgets[#budgets + 1] = {'account', tonumber(acct[16]), KEYS[next_key],
      tonumber(ARGV[8]), tonumber(ARGV[9])}
    next_key = next_key + 1
  end
  if key_period then
    budgets[#budgets + 1] = {'key', tonumber(key[11]), KEYS[next_key],
      tonumber(ARGV[10]), tonumber(ARGV[11])}
  end
  for _, b in ipairs(budgets) do
    if stale or not b[3] or not b[4] or not b[5] or now_ms < b[4] or now_ms >= b[5] then
      stale = true
    end
  end
  if stale then
    local r = reply_rejected('budget_period_stale')
    r[16] = budget_shape
    r[22] = model_shape
    return r
  end
end
if writing and (ARGV[12] or '') ~= model_shape then
  local r = reply_rejected('model_limits_stale')
  r[16] = budget_shape
  r[22] = model_shape
  return r
end

-- Release holds whose request outlived its TTL: the gateway holding them is gone.
local swept = 0
if writing then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms, 'LIMIT', 0, MAX_SWEEP)
  for _, rid in ipairs(expired) do
    local record = redis.call('HGET', KEYS[5], rid)
    if record then
      local kid, held = string.match(record, '^([^|]*)|(%d+)|')
      if held ~= '0' then redis.call('HINCRBY', account_key, 'held_nano', '-' .. held) end
      -- Its budgets keep the worst case as spent: what it really cost is never known here.
      -- (Its spend hashes share the account's hash tag: the same slot as every key here.)
      local spends = string.match(record, '^[^|]*|%d+|%d+|[^|]*|([^#]*)')
      if spends and held ~= '0' then
        for spend in string.gmatch(spends, '[^|]+') do
          redis.call('HINCRBY', spend, 'held_nano', '-' .. held)
          redis.call('HINCRBY', spend, 'spent_nano', held)
        end
      end
      redis.call('HDEL', KEYS[5], rid)
      redis.call('XADD', KEYS[6], '*', 'type', 'hold_expired', 'request_id', rid,
        'key_id', kid, 'hold_nano', held, 'cost_nano', '0')
      redis.call('HINCRBY', account_key, 'holds_expired', 1)
      swept = swept + 1
    end
    redis.call('ZREM', KEYS[4], rid)
  end
  if swept > 0 then acct[8] = redis.call('HGET', account_key, 'held_nano') end
end

local balance = tonumber(acct[7] or '0')
local held = tonumber(acct[8] or '0')
local topped_up = tonumber(acct[9] or '0')

-- RPM policies (docs/limits-and-balance.md): an override wins; else the policy computes the account's rpm.
local account_rpm = tonumber(acct[2])
local policy = acct[5] or 'fixed'
if acct[6] then
  account_rpm = tonumber(acct[6])
elseif policy == 'balance' then
  if topped_up <= 0 then
    account_rpm = 6
  else
    account_rpm = math.min(math.max(math.floor(balance * 3 / 1e9), 30), 1800)
  end
elseif policy == 'tier' then
  local usd = topped_up / 1e9
  if usd >= 1000 then account_rpm = 600
  elseif usd >= 250 then account_rpm = 300
  elseif usd >= 50 then account_rpm = 120
  elseif usd >= 5 then account_rpm = 30
  else account_rpm = 6 end
end

-- {hash, capacity, cost, kind, stored level, stored ts, model pattern's {scope, pattern}},
-- in pairs (rpm, tpm) of one hash.
local buckets = {
  {account_key, account_rpm, 1, 'rpm', acct[11], acct[12]},
  {account_key, tonumber(acct[3]), estimated_tokens, 'tpm', acct[13], acct[14]},
  {key_key, tonumber(key[4]), 1, 'rpm', key[7], key[8]},
  {key_key, tonumber(key[5]), estimated_tokens, 'tpm', key[9], key[10]},
}
if writing and model_shape ~= '' then
  local k = tonumber(ARGV[13])
  for a = 14, #ARGV, 4 do
    local hash, who = KEYS[k], {ARGV[a], ARGV[a + 1]}
    local s = redis.call('HMGET', hash, 'rpm_level', 'rpm_ts', 'tpm_level', 'tpm_ts')
    buckets[#buckets + 1] = {hash, tonumber(ARGV[a + 2]), 1, 'rpm', s[1], s[2], who}
    buckets[#buckets + 1] = {hash, tonumber(ARGV[a + 3]), estimated_tokens, 'tpm', s[3], s[4], who}
    k = k + 1
  end
end
if not writing then
  for _, b in ipairs(buckets) do b[3] = 0 end
end

local reason, wait_ms, hit_limit = nil, 0, -1
local hit_model = nil
local levels = {}
for i, b in ipairs(buckets) do
  local capacity = b[2]
  if capacity then
    local level = capacity
    if b[5] and b[6] then
      local elapsed = math.max(now_ms - tonumber(b[6]), 0)
      level = math.min(capacity, tonumber(b[5]) + elapsed * capacity / 60000)
    end
    levels[i] = level
    if b[3] > capacity then
      -- Waiting can never cure this one: report it above any other reason.
      if reason ~= 'request_exceeds_limit' then
        reason, wait_ms, hit_limit, hit_model = 'request_exceeds_limit', 0, capacity, b[7]
      end
    elseif level < b[3] and reason ~= 'request_exceeds_limit' then
      local need_ms = math.ceil((b[3] - level) * 60000 / capacity)
      if need_ms > wait_ms or not reason then
        reason, wait_ms, hit_limit, hit_model = b[4] .. '_exceeded', need_ms, capacity, b[7]
      end
    end
  end
end

local prepaid = acct[10] == '1'
local available = balance - held
if writing and prepaid and hold_nano > available and reason ~= 'request_exceeds_limit' then
  reason, wait_ms, hit_limit = 'balance_exceeded', 0, -1
end

-- Each budget must take the whole hold; of two refusing, the later reset is the real wait.
local budget_hit = nil
for _, b in ipairs(budgets) do
  local spend = redis.call('HMGET', b[3], 'spent_nano', 'held_nano')
  b[6] = tonumber(spend[1] or '0') + tonumber(spend[2] or '0')
  if b[6] + hold_nano > b[2] and (not budget_hit or b[5] > budget_hit[5]) then
    budget_hit = b
  end
end
if budget_hit and reason ~= 'request_exceeds_limit' and reason ~= 'balance_exceeded' then
  reason, wait_ms, hit_limit = 'budget_exceeded', budget_hit[5] - now_ms, -1
end

-- Concurrency leases expire on their own, so a dead gateway cannot keep its slots. The
-- account's leases are its in-flight set (the sweep above trims it); a key's have their own.
local lease_sets = {{KEYS[4], tonumber(acct[4])}, {KEYS[3], tonumber(key[6])}}
local conc_limit, conc_in_use = -1, -1
for i, s in ipairs(lease_sets) do
  if s[2] then
    if writing and i == 2 then redis.call('ZREMRANGEBYSCORE', s[1], '-inf', now_ms) end
    local in_use = redis.call('ZCOUNT', s[1], '(' .. now_ms, '+inf')
    if conc_limit < 0 or s[2] - in_use < conc_limit - conc_in_use then
      conc_limit, conc_in_use = s[2], in_use
    end
    if writing and in_use >= s[2] and not reason then
      -- No refill time exists for a slot; a second is the smallest honest hint.
      reason, wait_ms, hit_limit = 'concurrency_exceeded', 1000, s[2]
    end
  end
end

local allowed = writing and not reason
if allowed then
  -- One HSET per hash: buckets 1-2 are the account's, 3-4 the key's, then a pair per
  -- model pattern, whose hash expires once both its buckets would be full again.
  local model_record = ''
  for first = 1, #buckets - 1, 2 do
    local f = {}
    local full_ms = 0
    for i = first, first + 1 do
      local b = buckets[i]
      if b[2] then
        levels[i] = levels[i] - b[3]
        f[#f + 1] = b[4] .. '_level'
        f[#f + 1] = tostring(levels[i])
        f[#f + 1] = b[4] .. '_ts'
        f[#f + 1] = now_ms
        full_ms = math.max(full_ms, math.ceil((b[2] - levels[i]) * 60000 / b[2]))
      end
    end
    if #f > 0 then redis.call('HSET', buckets[first][1], unpack(f)) end
    if first > 4 then
      if #f > 0 then redis.call('PEXPIRE', buckets[first][1], full_ms + 1000) end
      if buckets[first + 1][2] then
        model_record = model_record .. '#' .. buckets[first][1] .. '=' .. buckets[first + 1][2]
      end
    end
  end
  if key[6] then
    redis.call('ZADD', KEYS[3], now_ms + ttl_ms, request_id)
    redis.call('PEXPIRE', KEYS[3], ttl_ms + 60000)
  end
  if conc_limit >= 0 then conc_in_use = conc_in_use + 1 end
  local record = key_id .. '|' .. ARGV[5] .. '|' .. ARGV[4] .. '|' ..
    string.format('%d', now_ms + ttl_ms)
  if #budgets > 0 then
    local spends = {'', ''}
    for _, b in ipairs(budgets) do
      spends[b[1] == 'account' and 1 or 2] = b[3]
      redis.call('HINCRBY', b[3], 'held_nano', ARGV[5])
      redis.call('PEXPIREAT', b[3], string.format('%d', b[5] + ttl_ms + SPEND_MARGIN_MS))
    end
    record = record .. '|' .. spends[1] .. '|' .. spends[2]
  end
  record = record .. model_record
  redis.call('HSET', KEYS[5], request_id, record)
  redis.call('ZADD', KEYS[4], now_ms + ttl_ms, request_id)
  if hold_nano > 0 then
    redis.call('HINCRBY', account_key, 'held_nano', ARGV[5])
    available = available - hold_nano
  end
end

-- Report the tightest bucket of each kind: the one with the least left.
local report = {rpm = {-1, -1, -1}, tpm = {-1, -1, -1}}
for i, b in ipairs(buckets) do
  if b[2] then
    local left = math.max(math.floor(levels[i]), 0)
    local r = report[b[4]]
    if r[1] < 0 or left < r[2] then
      r[1], r[2], r[3] = b[2], left, math.ceil((b[2] - levels[i]) * 60000 / b[2])
    end
  end
end

local available_text = ''
if prepaid then available_text = string.format('%.0f', available) end
if allowed then reason = 'ok' end
if reason ~= 'rpm_exceeded' and reason ~= 'tpm_exceeded' and reason ~= 'request_exceeds_limit' then
  hit_model = nil
end
local budget_scope, budget_cap, budget_used, budget_end = '', '', '', 0
if reason == 'budget_exceeded' then
  budget_scope, budget_end = budget_hit[1], budget_hit[5]
  budget_cap = string.format('%.0f', budget_hit[2])
  budget_used = string.format('%.0f', budget_hit[6])
end
return {allowed and 1 or 0, reason or 'ok', wait_ms, hit_limit,
  report.rpm[1], report.rpm[2], report.rpm[3], report.tpm[1], report.tpm[2], report.tpm[3],
  conc_limit, conc_in_use, available_text, swept, account_rpm or -1,
  budget_shape, now_ms, budget_scope, budget_cap, budget_used, budget_end,
  model_shape, hit_model and hit_model[1] or '', hit_model and hit_model[2] or ''}
