-- Jobs the worker preempted on its own for room (it keeps them, to recompute there): each counts once, for the client
-- (num_preemptions) and against the job's bound (ordered_preemptions: what the policies and the worker bound).
-- KEYS[i] job hash; ARGV[1] worker id. A job that finished, was aborted or moved since is left as it is.
-- Returns the positions (1-based) of the jobs counted.
local counted = {}
for i, key in ipairs(KEYS) do
  local st = redis.call('HMGET', key, 'status', 'worker')
  if st[1] == 'running' and st[2] == ARGV[1] then
    redis.call('HINCRBY', key, 'num_preemptions', 1)
    redis.call('HINCRBY', key, 'ordered_preemptions', 1)
    counted[#counted + 1] = i
  end
end
return counted
