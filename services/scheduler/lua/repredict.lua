-- The worker's re-estimates of jobs' output lengths (its length probe): kept on each job it still runs.
-- KEYS[i] job hash; ARGV[1] worker id, ARGV[1 + i] estimated output tokens of KEYS[i]'s job.
-- A job that finished, was aborted or moved since is left as it is (and a deleted one is not re-created).
-- Returns the positions (1-based) of the jobs that kept their estimate.
local kept = {}
for i, key in ipairs(KEYS) do
  local st = redis.call('HMGET', key, 'status', 'worker')
  if st[1] == 'running' and st[2] == ARGV[1] then
    redis.call('HSET', key, 'repred_len', ARGV[1 + i])
    kept[#kept + 1] = i
  end
end
return kept
