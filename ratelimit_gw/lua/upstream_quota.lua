-- upstream_quota.lua: the shared quota of one upstream key (a provider or custom endpoint).
--
-- A provider or custom endpoint may carry rpm/tpm limits: the quota of the one upstream
-- key that every account and every gateway instance shares (docs/custom-endpoints.md). They are token buckets
-- exactly like admit.lua's (capacity N, continuous refill N/60 per second, Redis TIME), but
-- shared by all accounts, so they cannot live in an account's hash slot: the gateway runs
-- this script just before admit.lua, gives the reservation back if the account then
-- refuses, and corrects the tpm bucket to the real usage at settlement.
--
-- Mode "reserve": if every configured bucket holds enough, consume ARGV[4] requests and
-- ARGV[5] tokens from them; otherwise consume nothing and report the real wait (the longest
-- of the buckets that are short). Mode "refund": give back ARGV[4] requests and ARGV[5]
-- tokens, never above capacity; a negative token count is an extra debit (usage above the
-- estimate), which may take the bucket below zero, from where it refills.
--
-- KEYS (one hash tag per quota): 1 rpm bucket   2 tpm bucket
-- ARGV:
--   1 mode ("reserve" | "refund")   2 rpm quota (-1 = none)   3 tpm quota (-1 = none)
--   4 requests (integer)   5 tokens (integer)
-- Reply (fixed shape):
--   {allowed (1 | 0; always 1 for "refund"),
--    reason ("ok" | "rpm_exceeded" | "tpm_exceeded" | "request_exceeds_limit"),
--    retry_after_ms, hit_limit (quota that refused, -1 if none),
--    rpm level after (string, "" = no rpm quota), tpm level after (string, "" = none)}
-- Buckets are hashes {level, ts} as in admit.lua: level a float of units, ts Redis ms.

local mode = ARGV[1]
local reserving = mode == 'reserve'

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- {bucket key, capacity, amount, kind}
local buckets = {
  {KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[4]), 'rpm'},
  {KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[5]), 'tpm'},
}

local reason, wait_ms, hit_limit = nil, 0, -1
local levels = {}
for i, b in ipairs(buckets) do
  local capacity = b[2]
  if capacity > 0 then
    local state = redis.call('HMGET', b[1], 'level', 'ts')
    local level = capacity
    if state[1] then
      local elapsed = math.max(now_ms - tonumber(state[2]), 0)
      level = math.min(capacity, tonumber(state[1]) + elapsed * capacity / 60000)
    end
    levels[i] = level
    if reserving then
      if b[3] > capacity then
        -- Waiting can never cure this one: report it above any other reason.
        if reason ~= 'request_exceeds_limit' then
          reason, wait_ms, hit_limit = 'request_exceeds_limit', 0, capacity
        end
      elseif level < b[3] and reason ~= 'request_exceeds_limit' then
        local need_ms = math.ceil((b[3] - level) * 60000 / capacity)
        if need_ms > wait_ms or not reason then
          reason, wait_ms, hit_limit = b[4] .. '_exceeded', need_ms, capacity
        end
      end
    end
  end
end

if not reason then
  for i, b in ipairs(buckets) do
    if b[2] > 0 and b[3] ~= 0 then
      if reserving then
        levels[i] = levels[i] - b[3]
      else
        levels[i] = math.min(b[2], levels[i] + b[3])
      end
      redis.call('HSET', b[1], 'level', tostring(levels[i]), 'ts', now_ms)
      redis.call('PEXPIRE', b[1], 120000)
    end
  end
end

local function level_text(i)
  if levels[i] == nil then return '' end
  return tostring(levels[i])
end

return {reason and 0 or 1, reason or 'ok', wait_ms, hit_limit, level_text(1), level_text(2)}
