-- Any live state -> aborted. Returns {1, previous status, worker, swapped_on} or {0, status}.
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] packed token ids, KEYS[4] text, KEYS[5] the tenant's live set
-- ARGV[1] job id, ARGV[2] now, ARGV[3] ttl seconds, ARGV[4] worker job-set key prefix
local st = redis.call('HMGET', KEYS[1], 'status', 'worker', 'swapped_on')
if not st[1] then return {0, 'missing'} end
if st[1] ~= 'queued' and st[1] ~= 'running' then return {0, st[1]} end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
if st[2] and st[2] ~= '' then redis.call('SREM', ARGV[4] .. st[2] .. ':jobs', ARGV[1]) end
redis.call('HSET', KEYS[1], 'status', 'aborted', 'finish_reason', 'aborted', 'finished', ARGV[2])
drop_prompt(KEYS[1])                                      -- _ended_job.lua
for i = 1, 4 do if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[3]) end end
return {1, st[1], st[2] or '', st[3] or ''}
