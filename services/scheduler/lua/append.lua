-- Record one engine step's tokens for many jobs at once (one script call per step, not per job). Only the
-- job's current worker may append; tokens from any other worker are refused, so a job is never advanced by
-- two workers. Returns, per job, its token count after the append (0 = refused), which tells client streams
-- where each chunk starts (a re-attached stream skips what it already has).
-- KEYS: per job, its hash, token list and text string (3 keys each, in job order)
-- ARGV[1] worker id, ARGV[2] now, then per job: text delta, number of tokens n, then the n token ids
local out, a = {}, 3
for k = 1, #KEYS, 3 do
  local text, n = ARGV[a], tonumber(ARGV[a + 1])
  local first, last = a + 2, a + 1 + n
  a = last + 1
  local st = redis.call('HMGET', KEYS[k], 'status', 'worker')
  if st[1] ~= 'running' or st[2] ~= ARGV[1] then
    out[#out + 1] = 0
  else
    local count
    if n > 0 then count = redis.call('RPUSH', KEYS[k + 1], unpack(ARGV, first, last))
    else count = redis.call('LLEN', KEYS[k + 1]) end
    if text ~= '' then redis.call('APPEND', KEYS[k + 2], text) end
    redis.call('HSETNX', KEYS[k], 'first_token', ARGV[2])
    out[#out + 1] = count
  end
end
return out
