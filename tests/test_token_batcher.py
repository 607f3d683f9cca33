"""With many sequences running, the worker sends each job's tokens every few steps; first tokens, last tokens
and everything before a preempt / abort / failure report go out at once, and nothing is lost or reordered."""
from __future__ import annotations

from services.worker.engine import TokenDelta
from services.worker.token_batcher import TokenBatcher


def d(job: str, *ids: int) -> TokenDelta:
    return TokenDelta(job, list(ids), "".join(chr(96 + i) for i in ids))


def sent(deltas) -> dict[str, tuple[list[int], str]]:
    return {x.job_id: (x.token_ids, x.text) for x in deltas}


def test_below_the_threshold_every_step_is_sent_as_it_comes():
    b = TokenBatcher(updates_per_step=4)
    assert sent(b.step([d("a", 1), d("b", 2)], set(), running=4)) == {"a": ([1], "a"), "b": ([2], "b")}
    assert sent(b.step([d("a", 3), d("b", 4)], set(), running=4)) == {"a": ([3], "c"), "b": ([4], "d")}


def test_above_it_tokens_are_held_and_merged_but_first_and_last_tokens_never_wait():
    b = TokenBatcher(updates_per_step=2)                 # 6 running: all held tokens go out every 3 steps
    assert sent(b.step([d("a", 1), d("b", 2)], set(), running=6)) == {"a": ([1], "a"), "b": ([2], "b")}  # first
    assert sent(b.step([d("a", 3), d("b", 4), d("c", 5)], set(), running=6)) == {"c": ([5], "e")}  # c's first
    assert sent(b.step([d("a", 6), d("b", 7)], set(), running=6)) == {"a": ([3, 6], "cf"), "b": ([4, 7], "dg")}
    assert sent(b.step([d("a", 8), d("c", 9)], {"c"}, running=6)) == {"c": ([9], "i")}  # c ends: sent at once
    assert b.step([d("a", 10)], set(), running=6) == []
    assert sent(b.step([d("a", 11)], set(), running=6)) == {"a": ([8, 10, 11], "hjk")}   # in order, merged
    assert sent(b.step([d("c", 1)], set(), running=6)) == {"c": ([1], "a")}   # a finished id that comes back is new


def test_held_tokens_are_taken_before_a_preempt_and_dropped_with_the_session():
    b = TokenBatcher(updates_per_step=1)
    b.step([d("a", 1), d("b", 2)], set(), running=8)
    assert b.step([d("a", 3), d("b", 4)], set(), running=8) == []
    assert sent(b.take_all()) == {"a": ([3], "c"), "b": ([4], "d")}
    b.step([d("a", 5)], set(), running=8)
    b.forget("a")                                        # preempted: resumes with an urgent first token
    assert sent(b.step([d("a", 6)], set(), running=8)) == {"a": ([6], "f")}
    b.step([d("b", 7)], set(), running=8)
    b.clear()
    assert b.take_all() == []


def test_zero_sends_every_step():
    b = TokenBatcher(updates_per_step=0)
    b.step([d("a", 1)], set(), running=512)
    assert sent(b.step([d("a", 2)], set(), running=512)) == {"a": ([2], "b")}
