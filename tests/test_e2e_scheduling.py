"""Scheduling through the live stack: with one long job running, `alise` finishes the short jobs
first (preempting the long one, whose greedy output is unchanged), `fcfs` does not."""
from __future__ import annotations

import time

import pytest
from alise.v1 import generate_pb2 as pb

from tests.helpers import assert_greedy_equal, first_then_others, hf_greedy, kv_idle, request, stub_for, wait_until

LONG_PROMPT = "Write a long story about a lighthouse keeper."
# Long enough that, even on a busy 2-core machine, the short jobs are admitted while it still decodes.
LONG_TOKENS = 256
SHORT_PROMPTS = ["Name a colour.", "Say hello.", "Pick a number."]


@pytest.fixture(scope="module")
def long_reference(hf_model, tokenizer):
    return hf_greedy(hf_model, tokenizer, LONG_PROMPT, LONG_TOKENS)


def run_mix(stub) -> tuple[list[str], dict[str, tuple]]:
    """Start the long job, wait until it decodes, then send three short ones; return completion order."""
    tag = str(time.time_ns())
    return first_then_others(stub, ("long", request(LONG_PROMPT, f"long-{tag}", LONG_TOKENS, ignore_eos=True)),
                             [(f"short{i}", request(p, f"short{i}-{tag}", 4, ignore_eos=True))
                              for i, p in enumerate(SHORT_PROMPTS)])


@pytest.mark.parametrize("policy,preempt_mode,park_share", [("fcfs", "recompute", "0"), ("alise", "recompute", "0"),
                                                            ("alise", "swap", "0"), ("alise", "park", "0.8")])
def test_completion_order_by_policy(stack_factory, hf_model, tokenizer, long_reference, policy, preempt_mode,
                                    park_share):
    # A prediction that times out leaves a job unpredicted, and alise never preempts on a prior: on a busy
    # 2-core machine the predictor can take longer than the default 0.5 s, so this test waits for it. With park
    # (and prefill-early) the long job stops decoding but keeps its KV on the worker, and resumes from it.
    stack = stack_factory(scheduler_args=["--policy", policy, "--preempt-mode", preempt_mode,
                                          "--park-kv-share", park_share, "--predictor-timeout-s", "60"],
                          worker_args=["--max-batch", "1"])
    stub = stub_for(stack)
    order, results = run_mix(stub)
    assert len(order) == 4
    if policy == "fcfs":
        assert order[0] == "long", order
        assert results["long"][2].timings.num_preemptions == 0
    elif preempt_mode == "park":
        # parking costs the long job no recompute, so a short job overtakes it at once; how many more do depends
        # on the preemption bound and on when each short job's prediction lands (timing on a busy machine)
        assert order[0] != "long", order
        assert results["long"][2].timings.num_preemptions >= 1
    else:
        # the short jobs overtake the long one by preempting it. One whose prediction lands late on a busy machine
        # may find it preempted as often as the bound allows (--max-preemptions 2), or near its predicted end, and
        # then rightly waits for it (seen once in CI): so at least two of the three go first, not all three
        assert order.index("long") >= 2, order
        assert results["long"][2].timings.num_preemptions >= 1
    # preempted and resumed: the same greedy output
    assert_greedy_equal(hf_model, tokenizer.encode(LONG_PROMPT, add_special_tokens=False), results["long"][0],
                        long_reference)
    wait_until(lambda: kv_idle(stub), timeout=10)
