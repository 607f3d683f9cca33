-- Create a job and queue it, atomically with the admission limits.
-- Returns 1 created, 2 the same request exists already (the client re-attaches to it), 0 the id is held by
-- a different live job, -1 the tenant has too many live jobs, -2 the queue is full.
-- A finished (or aborted, failed) job's id is free again: its old keys are replaced. The same request re-attaches
-- whatever its job's status, an ended one included (its answer or its error is replayed): one request id, one job,
-- so that a stream, a pending abort or an event of the old job can never be taken for a new one's. A client
-- starts a request over with a new id.
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] packed token ids, KEYS[4] text, KEYS[5] tenant's live set
-- ARGV[1] job id, ARGV[2] queue score, ARGV[3] fingerprint (also among the fields), ARGV[4] tenant live limit,
-- ARGV[5] queue limit, ARGV[6..] field, value pairs
local st = redis.call('HMGET', KEYS[1], 'status', 'fingerprint')
if st[1] then
  if st[2] == ARGV[3] then return 2 end
  if st[1] == 'queued' or st[1] == 'running' then return 0 end
end
if redis.call('SCARD', KEYS[5]) >= tonumber(ARGV[4]) then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return -2 end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'status', 'queued', unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
return 1
