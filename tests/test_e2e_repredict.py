"""Re-prediction through the live stack: a worker whose length probe has learned (its state saved by an earlier
run) estimates each job's length when it reads the prompt, and the scheduler keeps it with the job."""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig

from services.worker.config import WorkerConfig
from services.worker.factory import probe_model_key
from services.worker.length_probe import MIN_OBSERVATIONS, LengthProbe
from tests.helpers import generate, request, stub_for


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
