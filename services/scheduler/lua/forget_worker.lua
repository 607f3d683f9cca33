-- A worker leaves the registry of known workers, once no job is recorded as running on it: a job left there (a
-- requeue that failed, or that was refused) must stay findable by the orphan sweep, which walks the registry.
-- KEYS[1] worker registry set, KEYS[2] the worker's hash, KEYS[3] the worker's job set
-- ARGV[1] worker id
if redis.call('SCARD', KEYS[3]) > 0 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
