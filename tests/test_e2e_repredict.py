"""Re-prediction through the live stack: a worker whose length probe has learned (its state saved by an earlier
run) estimates each job's length when it reads the prompt, the scheduler keeps it with the job, and alise acts on
it: a running job the probe finds long is parked for a waiting one it finds short."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from alise.v1 import generate_pb2 as pb
from transformers import AutoConfig

from services.worker.config import WorkerConfig
from services.worker.factory import probe_model_key
from services.worker.length_probe import MIN_OBSERVATIONS, LengthProbe
from services.worker.sequence import Sampling
from tests.helpers import generate, job_status, kv_idle, request, stub_for, wait_until
from tests.test_engine import make_engine


def trained_probe_file(model_dir, path):
    """A probe state as a worker saves it, for SmolLM2's middle layer (the worker's default). It learned nothing
    but the mean, so it estimates exactly 100 tokens for any prompt."""
    cfg = AutoConfig.from_pretrained(model_dir)
    key = probe_model_key(WorkerConfig(model_dir=str(model_dir)), cfg)
    probe = LengthProbe(cfg.hidden_size, cfg.num_hidden_layers // 2, torch.device("cpu"), torch.float32, path=path,
                        model=key)
    for _ in range(MIN_OBSERVATIONS):
        probe.observe(np.zeros(probe.dims), 100)
    probe.save(path)
    return path


def test_the_workers_estimate_reaches_the_job(stack_factory, model_dir, tmp_path):
    state = trained_probe_file(model_dir, tmp_path / "probe.npz")
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


def probe_that_knows(model_dir, path, lengths: dict[str, int]):
    """A saved probe state that learned each prompt's output length (as if each had stopped there 32 times)."""
    cfg = AutoConfig.from_pretrained(model_dir)
    probe = LengthProbe(cfg.hidden_size, cfg.num_hidden_layers // 2, torch.device("cpu"), torch.float32, path=path,
                        model=probe_model_key(WorkerConfig(model_dir=str(model_dir)), cfg))
    for features, n in zip(probe_features(model_dir, list(lengths)), lengths.values()):
        for _ in range(MIN_OBSERVATIONS // 2):
            probe.observe(features, n)
    probe.save(path)
    return path


@pytest.mark.parametrize("probe", [True, False])
def test_a_running_job_the_probe_finds_long_is_parked_for_a_short_one(stack_factory, model_dir, tmp_path, probe):
    # One decode slot. The long job starts first; the short one arrives while it decodes. By their prompts alone
    # (the predictor's prior, bounded by max_tokens: 128 against 64) the long job is only 2x longer, under
    # alise's preempt ratio (4): without re-estimation it runs to its end first (probe=False, the control). The
    # probe estimates the long job at 128 and the short one at 3 once each prompt is read (the short one is
    # prefilled early, as it must wait for a slot), so the long job is parked and the short one finishes first.
    state = probe_that_knows(model_dir, tmp_path / "probe.npz", {LONG_PROMPT: 400, SHORT_PROMPT: 3})
    probe_args = ["--length-probe-path", str(state), "--length-probe-read-only"] if probe else ["--length-probe-layer=-2"]
    stack = stack_factory(scheduler_args=["--policy", "alise", "--park-wait-factor", "0",
                                          "--predictor-timeout-s", "60"],
                          worker_args=["--max-batch", "1", *probe_args])
    stub = stub_for(stack)
    tag = str(time.time_ns())
    order, done = [], {}
    lock = threading.Lock()

    def one(name: str, req: pb.GenerateRequest) -> None:
        final = generate(stub, req, timeout=300)[2]
        with lock:
            order.append(name)
            done[name] = final

    long_job = threading.Thread(target=one, args=("long", request(LONG_PROMPT, f"long-{tag}", 128, ignore_eos=True)))
    long_job.start()
    wait_until(lambda: job_status(stub, f"long-{tag}") == pb.JOB_STATUS_RUNNING, 60, 0.02)
    wait_until(lambda: len(stub.GetJob(pb.GetJobRequest(request_id=f"long-{tag}")).token_ids) > 0, 120, 0.05)
    short_job = threading.Thread(target=one, args=("short", request(SHORT_PROMPT, f"short-{tag}", 64,
                                                                     ignore_eos=True)))
    short_job.start()
    for t in (long_job, short_job):
        t.join(300)
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
    wait_until(lambda: kv_idle(stub), timeout=10)
