-- queued -> running on a worker. Fails if the job is not queued (aborted, already claimed).
-- The worker joins the registry of known workers, so a job placed on a worker that vanishes is found
-- by the orphan sweep whatever happened to the worker's session.
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] worker's job set, KEYS[4] worker registry set
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] now
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2])
redis.call('HSETNX', KEYS[1], 'first_scheduled', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[2])
return 1
