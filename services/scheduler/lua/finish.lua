-- running on a worker -> finished. Only the job's current worker can finish it.
-- KEYS[1] job hash, KEYS[2] worker's job set, KEYS[3] token list, KEYS[4] text, KEYS[5] observation stream
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] finish reason, ARGV[4] now, ARGV[5] ttl seconds,
-- ARGV[6] '1' when the output length is a true (uncensored) one for the predictor, ARGV[7] stream max entries
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'finished', 'finish_reason', ARGV[3], 'finished', ARGV[4])
redis.call('SREM', KEYS[2], ARGV[1])
for i = 1, 4 do if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[5]) end end
if ARGV[6] == '1' then
  -- in the same transaction as the finish: a learned length is never lost
  local f = redis.call('HMGET', KEYS[1], 'prompt_text', 'previous_reply_tokens')
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'job_id', ARGV[1], 'prompt', f[1],
             'output_tokens', redis.call('LLEN', KEYS[3]), 'previous_reply_tokens', f[2] or '0')
end
return 1
