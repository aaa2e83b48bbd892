-- pool_pick.lua: pick an upstream key of a provider's pool and reserve its ceilings, atomically.
--
-- A provider may hold several upstream keys (SPEC §14). Every gateway instance picks from the
-- same pool, so the choice and the reservation are one step here, with no instance-local
-- counter: two instances can never both take a key's last request.
--
-- Mode "pick": among the keys given that are healthy (not in the unhealthy set), not cooling
-- down (no cool-down key alive) and whose rpm and tpm buckets both hold this request, take
-- the one with the most headroom: min(rpm level / rpm ceiling, tpm level / tpm ceiling), a
-- key without a ceiling counting 1.0. Keys within TIE of the best are tied; a per-pool
-- counter rotates among them, so ties rotate across instances too. The provider's own
-- ceiling (the pool's buckets) must hold the request as well. The picked key's buckets and
-- the pool's lose ARGV[2] requests and ARGV[3] tokens; nothing else is written but the
-- counter. When nothing can be picked, nothing is written and the reply says why and when
-- the soonest key frees up: its cool-down ends and its buckets have refilled to fit the
-- request (and the pool's buckets too). Unhealthy keys free up only when marked healthy
-- (a probe), which this script cannot foresee: they add no wait.
-- Mode "refund": give ARGV[2] requests and ARGV[3] tokens back to every key given and to the
-- pool, never above capacity (a failed attempt; settlement's correction); a negative token
-- count is an extra debit, which may take a bucket below zero, from where it refills.
-- Mode "peek": write nothing; report each key's state and headroom (metrics).
--
-- KEYS (one hash tag per pool, so one cluster slot):
--   1 pool rpm bucket   2 pool tpm bucket   3 tie counter   4 unhealthy set (key names)
--   then per key i (0-based): 5+3i rpm bucket   6+3i tpm bucket
--   7+3i cool-down marker (a string whose TTL is the cool-down)
-- ARGV:
--   1 mode ("pick" | "refund" | "peek")   2 requests (integer)   3 tokens (integer)
--   4 pool rpm ceiling (-1 = none)   5 pool tpm ceiling (-1 = none)
--   then per key i: 6+3i name   7+3i rpm ceiling (-1 = none)   8+3i tpm ceiling (-1 = none)
-- Reply (fixed shape):
--   "pick": {picked (1 | 0), key name ("" if none), reason, retry_after_ms (0 when picked,
--            or when waiting cannot help), the picked key's headroom before (string)}
--     reason: "ok"; "all_unhealthy" (no healthy key); "request_exceeds_limit" (larger than
--     every healthy key's ceiling, or the pool's: waiting cannot help); "provider_full" (the
--     pool's own ceiling is the longest wait); "all_cooling" / "all_full" (what holds back
--     the key that frees up soonest: its cool-down, or its buckets).
--   "refund": {}
--   "peek": per key: name, state ("ok" | "cooling" | "unhealthy"), cooling_until_ms
--           (Redis time, 0 if not cooling), rpm headroom, tpm headroom (strings, "" = no
--           ceiling)
-- Buckets are hashes {level, ts} exactly as in upstream_quota.lua: level a float of units,
-- ts Redis ms; a missing bucket is full; a ceiling of N holds N and refills N/60000 per ms.

local mode = ARGV[1]
local requests, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local TIE = 1e-9  -- float noise, not a policy: only equal headroom rotates
local BUCKET_TTL_MS = 120000  -- a bucket untouched this long is full: its hash may go

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function level_of(key, capacity)
  local state = redis.call('HMGET', key, 'level', 'ts')
  if not state[1] then return capacity end
  local elapsed = math.max(now_ms - tonumber(state[2]), 0)
  return math.min(capacity, tonumber(state[1]) + elapsed * capacity / 60000)
end

-- A bucket: {key, capacity (-1 = none), amount, level (nil without a ceiling)}.
local function bucket(key, capacity, amount)
  local b = {key, tonumber(capacity), amount, nil}
  if b[2] > 0 then b[4] = level_of(key, b[2]) end
  return b
end

-- 'never' if the request can never fit, else the ms until it fits (0: now).
local function wait_for(b)
  if b[2] <= 0 then return 0 end
  if b[3] > b[2] then return 'never' end
  if b[4] >= b[3] then return 0 end
  return math.ceil((b[3] - b[4]) * 60000 / b[2])
end

local function fraction(b)
  if b[2] <= 0 then return nil end
  return math.max(b[4], 0) / b[2]
end

local function write(b, level)
  redis.call('HSET', b[1], 'level', tostring(level), 'ts', now_ms)
  redis.call('PEXPIRE', b[1], BUCKET_TTL_MS)
end

local pool_buckets = {bucket(KEYS[1], ARGV[4], requests), bucket(KEYS[2], ARGV[5], tokens)}
local keys = {}
for i = 0, (#KEYS - 4) / 3 - 1 do
  keys[#keys + 1] = {
    name = ARGV[6 + 3 * i],
    cool_key = KEYS[7 + 3 * i],
    buckets = {
      bucket(KEYS[5 + 3 * i], ARGV[7 + 3 * i], requests),
      bucket(KEYS[6 + 3 * i], ARGV[8 + 3 * i], tokens),
    },
  }
end

if mode == 'refund' then
  for _, b in ipairs(pool_buckets) do
    if b[2] > 0 and b[3] ~= 0 then write(b, math.min(b[2], b[4] + b[3])) end
  end
  for _, k in ipairs(keys) do
    for _, b in ipairs(k.buckets) do
      if b[2] > 0 and b[3] ~= 0 then write(b, math.min(b[2], b[4] + b[3])) end
    end
  end
  return {}
end

-- One read of the unhealthy set rather than one per key.
local unhealthy = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[4])) do unhealthy[name] = true end

local function headroom(k)
  local h = 1.0
  for _, b in ipairs(k.buckets) do
    local f = fraction(b)
    if f and f < h then h = f end
  end
  return h
end

local function cooling_ms(k)
  return math.max(redis.call('PTTL', k.cool_key), 0)
end

if mode == 'peek' then
  local reply = {}
  for _, k in ipairs(keys) do
    local state, until_ms = 'ok', 0
    local cool = cooling_ms(k)
    if unhealthy[k.name] then
      state = 'unhealthy'
    elseif cool > 0 then
      state, until_ms = 'cooling', now_ms + cool
    end
    local rpm, tpm = fraction(k.buckets[1]), fraction(k.buckets[2])
    reply[#reply + 1] = k.name
    reply[#reply + 1] = state
    reply[#reply + 1] = until_ms
    reply[#reply + 1] = rpm and tostring(rpm) or ''
    reply[#reply + 1] = tpm and tostring(tpm) or ''
  end
  return reply
end

-- mode "pick"
local pool_wait = 0
for _, b in ipairs(pool_buckets) do
  local w = wait_for(b)
  if w == 'never' then return {0, '', 'request_exceeds_limit', 0, ''} end
  pool_wait = math.max(pool_wait, w)
end

local healthy, fitting = 0, 0
local soonest_ms, soonest_cooling = nil, false
local best, tied = nil, {}
for _, k in ipairs(keys) do
  if not unhealthy[k.name] then
    healthy = healthy + 1
    local cool = cooling_ms(k)
    local wait, fits = cool, true
    for _, b in ipairs(k.buckets) do
      local w = wait_for(b)
      if w == 'never' then fits = false else wait = math.max(wait, w) end
    end
    if fits then
      fitting = fitting + 1
      if wait == 0 then
        local h = headroom(k)
        if not best or h > best + TIE then
          best, tied = h, {k}
        elseif h >= best - TIE then
          tied[#tied + 1] = k
        end
      elseif not soonest_ms or wait < soonest_ms then
        soonest_ms, soonest_cooling = wait, cool > 0 and cool >= wait
      end
    end
  end
end

if healthy == 0 then return {0, '', 'all_unhealthy', 0, ''} end
if fitting == 0 then return {0, '', 'request_exceeds_limit', 0, ''} end
if not best then
  if pool_wait > soonest_ms then
    return {0, '', 'provider_full', pool_wait, ''}
  end
  return {0, '', soonest_cooling and 'all_cooling' or 'all_full', soonest_ms, ''}
end
if pool_wait > 0 then return {0, '', 'provider_full', pool_wait, ''} end

local chosen = tied[1]
if #tied > 1 then
  local turn = redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], 86400000)
  chosen = tied[(turn - 1) % #tied + 1]
end
for _, b in ipairs(pool_buckets) do
  if b[2] > 0 then write(b, b[4] - b[3]) end
end
for _, b in ipairs(chosen.buckets) do
  if b[2] > 0 then write(b, b[4] - b[3]) end
end
return {1, chosen.name, 'ok', 0, tostring(best)}
