"""`bench.live_vs_offline`'s run plan: repeated runs must not find each other's prompts in the prefix cache."""
from __future__ import annotations

import argparse

from bench.live_vs_offline import runs
from bench.workloads import BenchRequest


def test_every_run_starts_its_prompts_with_its_own_name_so_no_run_reuses_another_s_prefix():
    """Regression (review): repeats resent the same prompts, so later runs skipped their prefill from the cache."""
    reqs = [BenchRequest("Tell me about rivers.", 5),
            BenchRequest("And the longest?", 3, history=(("user", "Name a river."), ("assistant", "The Nile.")),
                         as_chat=True)]
    plan = runs(reqs, argparse.Namespace(prime=1, repeats=2))
    assert [name for name, _ in plan] == ["prime", "measured", "measured-2"]
    first_messages = [r.messages()[0]["content"] for _, batch in plan for r in batch]
    assert len(set(first_messages)) == len(first_messages)          # no two runs send the same opening
    for name, batch in plan:
        assert all(r.messages()[0]["content"].startswith(f"[{name}] ") for r in batch)
    assert [len(b) for _, b in plan] == [1, 2, 2] and plan[2][1][1].prompt == "And the longest?"
