-- running on a worker -> queued again (preempted, or its worker was lost). Keeps generated tokens.
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] worker's job set
-- ARGV[1] job id, ARGV[2] worker id, ARGV[3] queue score, ARGV[4] worker holding its swapped KV ('' = none),
-- ARGV[5] why (job_store.RequeueCause): 'preempted' by the scheduler, 'parked' after its early tokens as asked
-- (prefill early: no preemption), 'returned' for another reason (its worker was lost or restarted), 'counted' when
-- the worker had preempted it for room before the scheduler's order arrived (recomputed.lua counted that loss).
-- num_preemptions counts every time a job was handed back mid-way (what its client sees);
-- ordered_preemptions only the preemptions the bound counts: the scheduler's own (and a worker's for room, which
-- recomputed.lua counts)
local st = redis.call('HMGET', KEYS[1], 'status', 'worker')
redis.call('SREM', KEYS[3], ARGV[1])
if st[1] ~= 'running' or st[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '', 'swapped_on', ARGV[4])
if ARGV[5] ~= 'parked' and ARGV[5] ~= 'counted' then redis.call('HINCRBY', KEYS[1], 'num_preemptions', 1) end
if ARGV[5] == 'preempted' then redis.call('HINCRBY', KEYS[1], 'ordered_preemptions', 1) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
