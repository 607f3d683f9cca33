"""Re-prediction through the live stack: a worker whose length probe has learned (its state saved by an earlier
run) estimates each job's length when it reads the prompt, the scheduler keeps it with the job, and alise acts on
it: a running job the probe finds long is parked for a waiting one it finds short."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from services.worker.config import WorkerConfig
from services.worker.factory import probe_model_key
from services.worker.length_probe import DIMS, MIN_OBSERVATIONS, LengthProbe
from services.worker.sequence import Sampling
from tests.helpers import first_then_others, generate, kv_idle, request, stub_for, wait_until
from tests.test_engine import make_engine


def saved_probe(model_dir, path, examples: list[tuple[np.ndarray, int]]):
    """A probe state as a worker saves it, for SmolLM2's middle layer (the worker's default), that learned each
    (features, output tokens) example as often as it must to start estimating."""
    cfg = AutoConfig.from_pretrained(model_dir)
    key = probe_model_key(WorkerConfig(model_dir=str(model_dir)), cfg)
    probe = LengthProbe(cfg.hidden_size, cfg.num_hidden_layers // 2, torch.device("cpu"), torch.float32, path=path,
                        model=key)
    for i in range(MIN_OBSERVATIONS):
        probe.observe(*examples[i % len(examples)])
    probe.save(path)
    return path


def test_the_workers_estimate_reaches_the_job(stack_factory, model_dir, tmp_path):
    # it learned nothing but the mean, so it estimates exactly 100 tokens for any prompt
    state = saved_probe(model_dir, tmp_path / "probe.npz", [(np.zeros(DIMS), 100)])
    stack = stack_factory(worker_args=["--length-probe-path", str(state)])
    stub = stub_for(stack)
    _, _, done = generate(stub, request("Tell me about the sea.", "probe-1", 6, ignore_eos=True))
    assert done.usage.completion_tokens == 6
    assert done.timings.repredicted_output_tokens == 6        # its estimate, 100, bounded by max_tokens
    # a probe that has not learned yet estimates nothing: the job keeps its prompt prediction only
    fresh = stack_factory(worker_args=["--length-probe-path", str(tmp_path / "new.npz")])
    _, _, done = generate(stub_for(fresh), request("Tell me about the sea.", "probe-2", 6, ignore_eos=True))
    assert done.timings.repredicted_output_tokens == 0


LONG_PROMPT = "Write a long story about a lighthouse keeper."
SHORT_PROMPT = "Say hello."


def probe_features(model_dir, prompts: list[str]) -> list[np.ndarray]:
    """The length probe's features of each prompt, read by a CPU engine as the stack's worker reads them (the
    scheduler's tokenization: no special tokens added)."""
    engine = make_engine(model_dir)
    for i, p in enumerate(prompts):
        engine.add(f"f{i}", engine.tokenizer.encode(p, add_special_tokens=False), Sampling(max_tokens=2, ignore_eos=True))
    engine.step()                                  # the prompts' step: their features are taken
    engine.flush()
    return [engine.probe_features[f"f{i}"].copy() for i in range(len(prompts))]


@pytest.mark.parametrize("probe", [True, False])
def test_a_running_job_the_probe_finds_long_is_parked_for_a_short_one(stack_factory, model_dir, tmp_path, probe):
    # One decode slot. The long job starts first; the short one arrives while it decodes. By their prompts alone
    # (the predictor's prior, bounded by max_tokens: 128 against 64) the long job is only 2x longer, under
    # alise's preempt ratio (4): without re-estimation it runs to its end first (probe=False, the control). The
    # probe estimates the long job at 128 and the short one at 3 once each prompt is read (the short one is
    # prefilled early, as it must wait for a slot), so the long job is parked and the short one finishes first.
    probe_args = ["--length-probe-layer=-2"]
    if probe:
        long_x, short_x = probe_features(model_dir, [LONG_PROMPT, SHORT_PROMPT])
        state = saved_probe(model_dir, tmp_path / "probe.npz", [(long_x, 400), (short_x, 3)])
        probe_args = ["--length-probe-path", str(state), "--length-probe-read-only"]
    # one early token: with more, the short job would run past its estimate (3) while parking, and its remaining
    # time would then rank it no shorter than the long one (this test is about the estimate, not early tokens)
    stack = stack_factory(scheduler_args=["--policy", "alise", "--park-wait-factor", "0", "--early-tokens", "1",
                                          "--predictor-timeout-s", "60"],
                          worker_args=["--max-batch", "1", *probe_args])
    tag = str(time.time_ns())
    order, results = first_then_others(stub_for(stack),
                                       ("long", request(LONG_PROMPT, f"long-{tag}", 128, ignore_eos=True)),
                                       [("short", request(SHORT_PROMPT, f"short-{tag}", 64, ignore_eos=True))])
    done = {name: final for name, (_, _, final) in results.items()}
    assert done["long"].usage.completion_tokens == 128 and done["short"].usage.completion_tokens == 64
    if probe:
        assert order == ["short", "long"], order
        assert done["long"].timings.repredicted_output_tokens == 128          # 400, bounded by max_tokens
        assert 1 <= done["short"].timings.repredicted_output_tokens <= 6      # ~3
        assert done["long"].timings.num_preemptions >= 1
    else:
        assert order == ["long", "short"], order
        assert done["long"].timings.num_preemptions == 0
        assert done["long"].timings.repredicted_output_tokens == 0
    wait_until(lambda: kv_idle(stub_for(stack)), timeout=10)
