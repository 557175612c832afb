-- shapesync's guarded cache fill (crates/sink-redis/src/guard.rs explains it).
-- KEYS: the cache key, its tombstone ("shapesync.tomb:" .. key), the flush stamp
-- (<prefix> .. "shapesync.flush"). ARGV: the ticket (microseconds of Redis' TIME, taken before the
-- database read), the window in ms (at most the sink's tombstone_ms), "string" or
-- "hash", an expiry in ms for the key (0: none), then the value or field/value pairs.
-- Returns 1 when it wrote the key, 0 when it refused.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ticket = tonumber(ARGV[1])
if not ticket or now - ticket > tonumber(ARGV[2]) * 1000 then return 0 end
for _, k in ipairs({KEYS[2], KEYS[3]}) do
  local stamp = tonumber(redis.call('GET', k) or '')
  if stamp and stamp >= ticket then return 0 end
end
if ARGV[3] == 'hash' then
  redis.call('DEL', KEYS[1])
  if #ARGV >= 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
else
  redis.call('SET', KEYS[1], ARGV[5])
end
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
