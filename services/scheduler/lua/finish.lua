-- running on a worker -> finished. Only the job's current worker can finish it.
-- KEYS[1] job hash, KEYS[2] worker's job set, KEYS[3] token list, KEYS[4] text
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] finish reason, ARGV[4] now, ARGV[5] ttl seconds
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'finished', 'finish_reason', ARGV[3], 'finished', ARGV[4])
redis.call('SREM', KEYS[2], ARGV[1])
for i = 1, 4 do if i ~= 2 then redis.call('EXPIRE', KEYS[i], ARGV[5]) end end
return 1
