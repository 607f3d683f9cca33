-- running on a worker -> finished. Only the job's current worker can finish it.
-- A job that stopped by itself (finish reason 'stop' by EOS, not by a client's stop string, ignore_eos off) also
-- appends its true output length
-- to the predictor's stream, in this same transaction: a learned length is never lost. Lengths cut at
-- max_tokens or forced by ignore_eos are censored and would teach the predictor wrong lengths (except, with the
-- benchmark-only --learn-forced-lengths, one forced by ignore_eos: there it is the workload's length). The prompt's ids and
-- text then leave the record (prompt_tokens stays): they are most of its bytes, and it is kept ARGV[5] seconds.
-- KEYS[1] job hash, KEYS[2] worker's job set, KEYS[3] packed token ids, KEYS[4] text, KEYS[5] observation stream,
-- KEYS[6] the tenant's live set
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] finish reason, ARGV[4] now, ARGV[5] ttl seconds,
-- ARGV[6] stream max entries, ARGV[7] '1' if a client's stop string ended it (a cut length, not the model's),
-- ARGV[8] '1' to learn a length forced by ignore_eos (the scheduler's --learn-forced-lengths: benchmarks only)
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'finished', 'finish_reason', ARGV[3], 'finished', ARGV[4])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
for i = 1, 4 do if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[5]) end end
if (ARGV[3] == 'stop' and ARGV[7] ~= '1') or (ARGV[3] == 'length' and ARGV[8] == '1') then
  local f = redis.call('HMGET', KEYS[1], 'prompt_text', 'previous_reply_tokens', 'sampling', 'newest_message_chars')
  local ok, sampling = pcall(cjson.decode, f[3] or '{}')
  local forced = ok and sampling['ignore_eos'] == true
  -- a natural stop (no ignore_eos), or a length ignore_eos forced (reached with ARGV[8] == '1' only)
  if ok and ((ARGV[3] == 'stop' and not forced) or (ARGV[3] == 'length' and forced)) then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'job_id', ARGV[1], 'prompt', f[1],
               'output_tokens', math.floor(redis.call('STRLEN', KEYS[3]) / 4), 'previous_reply_tokens', f[2] or '0',
               'newest_message_chars', f[4] or '0')
  end
end
drop_prompt(KEYS[1])                                      -- _ended_job.lua
return 1
