-- A worker's entry for a job that does not run there (it ended, or its record is gone) goes; a running one stays.
-- KEYS[1] job hash, KEYS[2] the worker's job set
-- ARGV[1] job id, ARGV[2] worker id
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
if st[1] == 'running' and st[2] == ARGV[2] then return 0 end
return redis.call('SREM', KEYS[2], ARGV[1])
