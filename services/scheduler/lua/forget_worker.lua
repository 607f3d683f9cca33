-- A worker leaves the registry of known workers (its jobs went back to the queue before).
-- KEYS[1] worker registry set, KEYS[2] the worker's hash
-- ARGV[1] worker id
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
