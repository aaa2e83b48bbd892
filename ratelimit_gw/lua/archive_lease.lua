-- archive_lease.lua: take, renew or give up the lease that makes one instance the archiver.
--
-- The holder renews its lease well before it ends; when the holder dies the lease expires and
-- the next instance to ask takes it. Writes are idempotent in Postgres, so two archivers for
-- a moment (a holder paused past its lease) duplicate nothing: the lease saves work, it does
-- not guard correctness.
--
-- KEYS: 1 lease key
-- ARGV: 1 this instance's token   2 lease length ms   3 "hold" (take or renew) | "release"
-- Reply: {1 this instance holds it (0 another does), the holder's token ("" none)}

local holder = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return {0, ''}
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
return {0, holder}
