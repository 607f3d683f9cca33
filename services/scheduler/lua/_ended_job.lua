-- Shared by the scripts that end a job (finish, abort, fail_step): job_store.py puts it before their own text.
-- An ended job's record stays readable for a while (GetJob, re-attach), but without its prompt, most of its bytes;
-- its token count stays for the usage figures (a record from before prompt_tokens existed gets it from the ids).
local function drop_prompt(job)
  if redis.call('HEXISTS', job, 'prompt_tokens') == 0 then
    local ids = redis.call('HGET', job, 'prompt_ids')
    if ids then redis.call('HSET', job, 'prompt_tokens', #cjson.decode(ids)) end
  end
  redis.call('HDEL', job, 'prompt_ids', 'prompt_text')
end
