"""Job state transitions against a real Redis server: the Lua scripts refuse every illegal move."""
import pytest
import redis.asyncio as aioredis

from services.scheduler import keys
from services.scheduler.job_store import (CreateOutcome, JobRecord, JobStore, RequeueCause, StepFailureOutcome,
                                          pack_tokens)
from tests.helpers import job_sampling


@pytest.fixture
async def store(redis_server):
    client = aioredis.from_url(redis_server.url)
    await client.flushdb()
    yield JobStore(client)
    await client.aclose()


def record(job_id="j1", fingerprint="f1"):
    return JobRecord(job_id=job_id, prompt_ids=[1, 2, 3], prompt_text="hi", sampling=job_sampling(8),
                     pred_len=10, pred_p90=20, predicted=True, fingerprint=fingerprint)


async def create(store, rec, score, tenant_live_limit=100, queue_limit=100) -> CreateOutcome:
    return await store.create(rec, score, tenant_live_limit, queue_limit)


async def test_lifecycle_queued_running_finished(store):
    assert await create(store, record(), 1.0) is CreateOutcome.CREATED
    assert await create(store, record(fingerprint="f2"), 1.0) is CreateOutcome.ID_IN_USE   # id taken
    assert await store.queue_head(10) == ["j1"]
    assert await store.claim("j1", "w1")
    assert not await store.claim("j1", "w2")                           # never run twice
    assert await store.known_workers() == ["w1"]                       # found by the orphan sweep
    assert await store.queue_head(10) == []
    assert await store.append_many("w1", [("j1", [5, 6], "ab")]) == [2]
    assert await store.append_many("w2", [("j1", [7], "c")]) == [0]  # not its worker
    assert await store.finish("j1", "w1", "stop")
    state = await store.state("j1")
    assert (state.status, state.token_ids, state.text, state.finish_reason) == ("finished", [5, 6], "ab", "stop")
    assert state.first_token is not None and await store.r.ttl(keys.job("j1")) > 0


async def test_one_step_appends_for_many_jobs_in_one_call_each_checked_on_its_own(store):
    for j in ("a", "b", "c"):
        await create(store, record(j, fingerprint=j), 1.0)
    assert await store.claim("a", "w1") and await store.claim("b", "w2") and await store.claim("c", "w1")
    step = [("a", [5], "x"), ("b", [6, 7], "yz"), ("c", [], ""), ("missing", [1], "m"), ("a", [8, 9], "")]
    assert await store.append_many("w1", step) == [1, 0, 0, 0, 3]       # b is w2's; c got nothing yet
    assert (await store.state("a")).token_ids == [5, 8, 9] and (await store.state("a")).text == "x"
    assert (await store.state("b")).token_ids == [] and await store.append_many("w1", []) == []
    assert (await store.state("c")).first_token is not None             # an empty delta still marks it started


async def test_requeue_keeps_tokens_and_is_only_allowed_for_the_holder(store):
    await create(store, record(), 5.0)
    await store.claim("j1", "w1")
    await store.append_many("w1", [("j1", [9], "x")])
    assert not await store.requeue("j1", "w2", score=2.0)
    assert await store.requeue("j1", "w1", score=2.0, swapped_on="w1")
    state = await store.state("j1")
    assert state.status == "queued" and state.token_ids == [9] and state.num_preemptions == 1
    assert state.swapped_on == "w1" and await store.worker_job_ids("w1") == []
    assert await store.claim("j1", "w2")


async def test_a_job_parked_after_its_first_token_is_not_counted_as_preempted(store):
    await create(store, record(), 5.0)
    await store.claim("j1", "w1")
    assert await store.requeue("j1", "w1", score=2.0, swapped_on="w1", cause=RequeueCause.PARKED)
    assert (await store.state("j1")).num_preemptions == 0 and (await store.progress("j1"))[2] == 0
    await store.claim("j1", "w1")
    assert await store.requeue("j1", "w1", score=2.0, swapped_on="w1", cause=RequeueCause.PREEMPTED)
    assert (await store.state("j1")).num_preemptions == 1 and (await store.progress("j1"))[2] == 1


async def test_abort_from_queue_and_from_running(store):
    await create(store, record("a"), 1.0)
    await create(store, record("b"), 2.0)
    await store.claim("b", "w1")
    assert await store.abort("a") == (True, "queued", "", "")
    assert await store.abort("b") == (True, "running", "w1", "")
    assert await store.queue_head(10) == [] and await store.worker_job_ids("w1") == []
    assert (await store.abort("b"))[:2] == (False, "aborted")
    assert (await store.abort("nope"))[:2] == (False, "missing")
    assert not await store.finish("b", "w1", "stop")                    # aborted stays aborted


async def test_only_uncensored_lengths_reach_the_predictor_stream(store):
    def chat(job_id, ignore_eos):
        return JobRecord(job_id=job_id, prompt_ids=[1], prompt_text=f"prompt {job_id}", previous_reply_tokens=7,
                         newest_message_chars=11, sampling=job_sampling(8, ignore_eos))

    for job_id, ignore_eos, reason, stop_string in [("eos", False, "stop", False), ("cut", False, "length", False),
                                                    ("forced", True, "stop", False), ("stop-string", False, "stop", True)]:
        await create(store, chat(job_id, ignore_eos), 1.0)
        await store.claim(job_id, "w1")
        await store.append_many("w1", [(job_id, [5, 6, 7], "abc")])
        assert await store.finish(job_id, "w1", reason, stop_string=stop_string)   # a client's stop string: a cut
    entries = [fields for _, fields in await store.r.xrange(keys.OBSERVATIONS)]
    assert entries == [{b"job_id": b"eos", b"prompt": b"prompt eos", b"output_tokens": b"3",
                        b"previous_reply_tokens": b"7", b"newest_message_chars": b"11"}]


async def test_a_length_forced_by_ignore_eos_reaches_the_stream_only_when_asked(store):
    # a benchmark with a random-weight model forces each output's length (ignore_eos, max_tokens): with
    # learn_forced it teaches that length, as a natural stop does in serving; a cut without ignore_eos never does
    def job(job_id, ignore_eos):
        return JobRecord(job_id=job_id, prompt_ids=[1], prompt_text=f"prompt {job_id}", sampling=job_sampling(3, ignore_eos))

    cases = [("forced", True, "length", True, False), ("forced-off", True, "length", False, False),
             ("cut", False, "length", True, False), ("forced-stop", True, "stop", True, False),
             ("eos", False, "stop", True, False), ("stop-string", False, "stop", True, True),
             ("forced-stop-string", True, "stop", True, True)]
    for job_id, ignore_eos, reason, learn, stop_string in cases:
        await create(store, job(job_id, ignore_eos), 1.0)
        await store.claim(job_id, "w1")
        await store.append_many("w1", [(job_id, [5, 6, 7], "abc")])
        assert await store.finish(job_id, "w1", reason, stop_string=stop_string, learn_forced=learn)
    entries = [fields for _, fields in await store.r.xrange(keys.OBSERVATIONS)]
    # the forced length, and a natural stop as always; never a cut, a stop string, or a stop under ignore_eos
    assert [(f[b"job_id"], f[b"output_tokens"]) for f in entries] == [(b"forced", b"3"), (b"eos", b"3")]


async def test_create_admits_within_limits_and_recognises_a_retry(store):
    assert await create(store, record("t/a"), 1.0, tenant_live_limit=2) is CreateOutcome.CREATED
    assert await create(store, record("t/a"), 1.0) is CreateOutcome.SAME_REQUEST          # re-attach
    assert await create(store, record("t/a", "other"), 1.0) is CreateOutcome.ID_IN_USE    # live: held
    assert await create(store, record("t/b"), 1.0, tenant_live_limit=2) is CreateOutcome.CREATED
    assert await create(store, record("t/c"), 1.0, tenant_live_limit=2) is CreateOutcome.TENANT_FULL
    assert await create(store, record("u/c"), 1.0, tenant_live_limit=2, queue_limit=2) is CreateOutcome.QUEUE_FULL
    assert await create(store, record("u/c"), 1.0, tenant_live_limit=2) is CreateOutcome.CREATED   # other tenant
    await store.claim("t/a", "w1")
    assert await store.append_many("w1", [("t/a", [5, 6], "ab")]) == [2]                # the count after it
    assert await store.append_many("w1", [("t/a", [7], "c")]) == [3]
    assert await store.finish("t/a", "w1", "length")
    assert await create(store, record("t/c"), 1.0, tenant_live_limit=2) is CreateOutcome.CREATED   # a slot freed
    assert await create(store, record("t/a", "new"), 1.0, tenant_live_limit=3) is CreateOutcome.CREATED  # id free
    state = await store.state("t/a")
    assert state.status == "queued" and state.token_ids == [] and state.text == ""        # nothing of the old job


async def test_the_same_request_re_attaches_to_its_job_however_it_ended_and_a_new_one_may_take_the_id(store):
    """One request id, one job: the same request sent again after its job finished, failed or was aborted gets that
    job (its answer or its error), never a second job under the same id and fingerprint, which a stream, a pending
    abort or a late event of the first could not tell from it (a session-30 mend that started such a retry over was
    found to do exactly that, and undone). A different request may take an ended job's id."""
    async def ended(job_id: str, how: str) -> None:
        await create(store, record(job_id), 1.0)
        await store.claim(job_id, "w1")
        await store.append_many("w1", [(job_id, [5], "a")])
        if how == "finished":
            assert await store.finish(job_id, "w1", "length")
        elif how == "failed":
            assert await store.fail_step(job_id, "w1", 1.0, 1) is StepFailureOutcome.FAILED
        else:
            assert (await store.abort(job_id))[0]

    for how in ("finished", "failed", "aborted"):
        await ended(f"t/{how}", how)
        assert await create(store, record(f"t/{how}"), 1.0) is CreateOutcome.SAME_REQUEST, how
        state = await store.state(f"t/{how}")
        assert (state.status, state.token_ids) == (how, [5]), how
        assert await create(store, record(f"t/{how}", "other"), 1.0) is CreateOutcome.CREATED, how


async def test_fail_step_requeues_then_fails(store):
    await create(store, record("t/a"), 1.0)
    await store.claim("t/a", "w1")
    await store.append_many("w1", [("t/a", [5], "a")])
    assert await store.fail_step("t/a", "w2", 1.0, 2) is StepFailureOutcome.NOT_HELD
    assert await store.fail_step("t/a", "w1", 1.0, 2) is StepFailureOutcome.REQUEUED
    state = await store.state("t/a")
    assert state.status == "queued" and state.token_ids == [5] and await store.queue_head(5) == ["t/a"]
    await store.claim("t/a", "w1")
    assert await store.fail_step("t/a", "w1", 1.0, 2) is StepFailureOutcome.FAILED
    state = await store.state("t/a")
    assert (state.status, state.finish_reason) == ("failed", "error") and await store.queue_head(5) == []
    assert await store.r.scard(keys.tenant_live("t")) == 0


async def test_a_length_reestimate_is_kept_only_on_a_job_the_worker_still_runs(store):
    for job_id in ("t/run", "t/queued", "t/other"):
        await create(store, record(job_id), 1.0)
    await store.claim("t/run", "w1")
    await store.claim("t/other", "w2")
    kept = await store.repredict("w1", [("t/queued", 5.0), ("t/run", 321.5), ("t/other", 6.0), ("t/gone", 7.0)])
    assert kept == [("t/run", 321.5)]
    assert (await store.state("t/run")).record.repred_len == 321.5
    assert (await store.state("t/queued")).record.repred_len == 0.0
    assert (await store.state("t/other")).record.repred_len == 0.0
    assert not await store.r.exists(keys.job("t/gone"))                      # not re-created


async def test_an_ended_job_keeps_its_prompt_token_count_but_not_its_prompt(store):
    """A finished, aborted or failed job stays readable for finished_ttl_s; its prompt (up to max_model_len * 32
    characters, most of the record) leaves Redis at once, its token count stays for the usage figures. Before,
    every ended prompt was kept an hour: a tenant sending giant prompts could fill Redis."""
    big = JobRecord(job_id="x", prompt_ids=[1] * 4000, prompt_text="a " * 100_000, sampling=job_sampling(8))
    for job_id in ("fin", "abo", "fail"):
        await create(store, JobRecord(**{**big.__dict__, "job_id": job_id, "fingerprint": job_id}), 1.0)
        await store.claim(job_id, "w1")
    assert await store.finish("fin", "w1", "length")
    assert (await store.abort("abo"))[0]
    assert await store.fail_step("fail", "w1", 1.0, 1) is StepFailureOutcome.FAILED
    for job_id in ("fin", "abo", "fail"):
        assert not await store.r.hexists(keys.job(job_id), "prompt_text")
        assert not await store.r.hexists(keys.job(job_id), "prompt_ids")
        assert (await store.state(job_id)).record.prompt_tokens == 4000
        assert await store.r.memory_usage(keys.job(job_id)) < 4096


def test_the_predictor_reads_at_most_newest_chars_of_a_message():
    from services.common.predictor_text import NEWEST_CHARS, predictor_text

    assert predictor_text(["x" * (NEWEST_CHARS * 8)]) == "x" * NEWEST_CHARS
    assert predictor_text(["earlier turn", "y" * (NEWEST_CHARS + 1)]) == "y" * NEWEST_CHARS + "\nearlier turn"


async def test_a_script_call_sent_twice_acts_once(store):
    """redis-py sends a command again when its connection fails; a script whose reply was lost then ran twice:
    the same tokens appended twice (a client saw them once, GetJob and resumes twice), a failed step counted twice.
    A call's second run (the same call id, as a retry sends it) now replays the first run's reply."""
    await create(store, record("a"), 1.0)
    await store.claim("a", "w1")
    append = store._scripts["append"].script
    call = dict(keys=[keys.job("a"), keys.job_tokens("a"), keys.job_text("a")],
                args=["w1", 1.0, "ab", pack_tokens([5, 6]), "call-1"])
    assert await append(**call) == [2]
    assert await append(**call) == [2]                                  # the retry: nothing appended again
    state = await store.state("a")
    assert (state.token_ids, state.text) == ([5, 6], "ab")
    assert await append(**{**call, "args": [*call["args"][:-1], "call-2"]}) == [4]   # a new call does append
    fail = store._scripts["fail_step"].script
    call = dict(keys=[keys.job("a"), keys.QUEUE, keys.worker_jobs("w1"), keys.job_tokens("a"), keys.job_text("a"),
                      keys.tenant_live("default")], args=["a", "w1", 1.0, 2, 2.0, 60, "1", "call-3"])
    assert await fail(**call) == StepFailureOutcome.REQUEUED
    assert await fail(**call) == StepFailureOutcome.REQUEUED            # not counted as a second failure
    assert await store.r.hget(keys.job("a"), "step_failures") == b"1"
    # a reply is kept as long as retries last, and not much longer (review, session 22: 300 s of every step's
    # reply, ~10 MB a busy worker)
    from services.common.redis_client import RETRY_SPAN_S
    assert RETRY_SPAN_S <= await store.r.ttl(keys.ONCE_PREFIX + "call-1") <= 2 * RETRY_SPAN_S


async def test_a_record_from_before_prompt_tokens_still_counts_its_prompt_when_it_ends(store):
    """A job admitted by an older scheduler has no prompt_tokens field; when it ends, its prompt ids leave the record,
    so the count must be taken from them first (else its usage said 0 prompt tokens)."""
    await create(store, record("old"), 1.0)
    await store.r.hdel(keys.job("old"), "prompt_tokens")               # as an older scheduler wrote it
    await store.claim("old", "w1")
    assert await store.finish("old", "w1", "length")
    assert (await store.state("old")).record.prompt_tokens == 3


async def test_a_workers_entry_goes_only_for_a_job_that_does_not_run_there(store):
    """drop_entry (review, session 23): what is left of an ended job, or of a lost record, goes; a job that runs on
    that worker (a new request that reused the id and was placed there meanwhile) keeps its entry."""
    await create(store, record("a", "fa"), 1.0)
    assert await store.claim("a", "w1")
    await store.drop_entry("a", "w1")
    assert await store.worker_job_ids("w1") == ["a"]                   # it runs there
    await store.r.sadd(keys.worker_jobs("w1"), "gone")                   # an entry whose record is gone
    await store.drop_entry("gone", "w1")
    assert await store.worker_job_ids("w1") == ["a"]
