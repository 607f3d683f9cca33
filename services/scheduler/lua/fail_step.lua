-- A job was on a worker whose engine step failed: running -> queued again (keeps its tokens), unless it
-- has now been in `max failures` failed steps: then running -> failed (finish reason 'error').
-- Returns 0 (not this worker's running job), 1 (requeued) or 2 (failed).
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] worker's job set, KEYS[4] packed token ids, KEYS[5] text,
-- KEYS[6] the tenant's live set
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] queue score, ARGV[4] max failures, ARGV[5] now, ARGV[6] ttl,
-- ARGV[7] '1' to count this failure against the job ('0': it only shared the step: requeued, not counted)
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
redis.call('SREM', KEYS[3], ARGV[1])
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
local failures = 0
if ARGV[7] == '1' then failures = redis.call('HINCRBY', KEYS[1], 'step_failures', 1) end
if ARGV[7] == '1' and failures >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finish_reason', 'error', 'finished', ARGV[5], 'worker', '')
  drop_prompt(KEYS[1])                                    -- _ended_job.lua
  redis.call('SREM', KEYS[6], ARGV[1])
  for i = 1, 5 do if i ~= 2 and i ~= 3 then redis.call('EXPIRE', KEYS[i], ARGV[6]) end end
  return 2
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '', 'swapped_on', '')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
