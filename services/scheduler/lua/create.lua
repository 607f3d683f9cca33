-- Create a job and queue it, unless the id is taken.
-- KEYS[1] job hash, KEYS[2] queue zset
-- ARGV[1] job id, ARGV[2] queue score, ARGV[3..] field, value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
