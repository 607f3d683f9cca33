-- Record one engine step's tokens for many jobs at once (one script call per step, not per job). Only the
-- job's current worker may append; tokens from any other worker are refused, so a job is never advanced by
-- two workers. Returns, per job, its token count after the append (0 = refused), which tells client streams
-- where each chunk starts (a re-attached stream skips what it already has).
-- Token ids travel and are stored packed (4 bytes each, little-endian; job_store.pack_tokens): one argument
-- and one APPEND per job instead of one per token, which is most of the cost at thousands of tokens a second.
-- KEYS: per job, its hash, packed token ids and text string (3 keys each, in job order)
-- ARGV[1] worker id, ARGV[2] now, then per job: text delta, packed token ids
local out = {}
for k = 1, #KEYS, 3 do
  local a = 3 + (k - 1) / 3 * 2
  local st = redis.call('HMGET', KEYS[k], 'status', 'worker')
  if st[1] ~= 'running' or st[2] ~= ARGV[1] then
    out[#out + 1] = 0
  else
    local bytes
    if ARGV[a + 1] ~= '' then bytes = redis.call('APPEND', KEYS[k + 1], ARGV[a + 1])
    else bytes = redis.call('STRLEN', KEYS[k + 1]) end
    if ARGV[a] ~= '' then redis.call('APPEND', KEYS[k + 2], ARGV[a]) end
    redis.call('HSETNX', KEYS[k], 'first_token', ARGV[2])
    out[#out + 1] = math.floor(bytes / 4)
  end
end
return out
