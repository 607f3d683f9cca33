"""A step's decode rows keep the turns of one conversation together (their prefix blocks shared through the prefix
cache), whatever order they were admitted in: the decode kernel then reads a shared block from programs running
about at once. Without the grouping a step's rows are in admission order."""
from __future__ import annotations

from services.worker.block_manager import BlockManager
from services.worker.sequence import Sampling, Sequence
from services.worker.step_scheduler import StepScheduler


def run_step(sched: StepScheduler) -> list[str]:
    """Plan a step, write its KV (register full blocks in the prefix cache), sample a token for each sequence whose
    last token it computed; the step's rows, in order."""
    plan = sched.schedule()
    for c in plan.chunks:
        sched.record_computed(c.seq)
        if c.start + c.num_tokens == c.seq.num_tokens:
            c.seq.output_ids.append(7)
    return [c.seq.job_id for c in plan.chunks]


def decode_rows(group: bool) -> list[str]:
    blocks = BlockManager(num_blocks=64, block_size=4, prefix_caching=True)
    sched = StepScheduler(blocks, max_batch=8, token_budget=64, max_model_len=200, group_prefix_rows=group)
    system = [1, 2, 3, 4]                               # every prompt's first block: no conversation in particular
    first = {"a": system + list(range(10, 22)), "b": system + list(range(40, 52))}
    for conv in "ab":
        sched.add(Sequence(f"{conv}1", first[conv], Sampling(max_tokens=50, ignore_eos=True)))
    run_step(sched)                                      # both first turns prefilled: their blocks are cached
    for conv in "ab":                                    # each second turn resends its first turn's prompt
        sched.add(Sequence(f"{conv}2", first[conv] + [5, 6, 7], Sampling(max_tokens=50, ignore_eos=True)))
    run_step(sched)
    # a2 holds a1's blocks; b2 holds a1's copy of the system block, then b1's own (b1 kept a copy of its own)
    assert blocks.table("a2")[:4] == blocks.table("a1")[:4]
    assert blocks.table("b2")[1:4] == blocks.table("b1")[1:4] and blocks.table("b2")[0] == blocks.table("a1")[0]
    return run_step(sched)                               # every one decodes


def test_turns_of_one_conversation_decode_next_to_each_other():
    rows = decode_rows(group=True)
    assert sorted(rows) == ["a1", "a2", "b1", "b2"]
    assert abs(rows.index("a1") - rows.index("a2")) == 1 and abs(rows.index("b1") - rows.index("b2")) == 1


def test_without_grouping_rows_keep_the_admission_order():
    assert decode_rows(group=False) == ["a1", "b1", "a2", "b2"]
