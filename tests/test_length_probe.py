"""The worker's length probe (services/worker/length_probe.py): its online ridge fit, and the engine taking the
served model's hidden state at the end of each fresh prompt, learning from jobs that stopped by themselves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from services.worker.length_probe import LengthProbe
from services.common.preempt_mode import PreemptMode
from services.worker.sequence import Finish, Sampling
from tests.test_engine import PROMPTS, make_engine, run_to_end


def synthetic(n: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features whose log-length is a linear function of them, plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dims))
    w = np.random.default_rng(99).normal(size=dims) / np.sqrt(dims)
    return x, np.maximum(1, np.round(np.exp(4 + x @ w + rng.normal(scale=0.2, size=n)))).astype(int)


def new_probe(tmp_path=None, **kw) -> LengthProbe:
    return LengthProbe(64, layer=3, device=torch.device("cpu"), dtype=torch.float32, dims=16,
                       path=tmp_path / "probe.npz" if tmp_path else None, **kw)


def test_probe_estimates_nothing_until_it_has_learned_then_ranks_lengths(tmp_path):
    probe = new_probe(min_observations=32)
    x, lengths = synthetic(400, 16, seed=0)
    for i in range(31):
        probe.observe(x[i], lengths[i])
        assert probe.estimate(x[0]) is None
    for i in range(31, 300):
        probe.observe(x[i], lengths[i])
    est = [probe.estimate(f) for f in x[300:]]
    assert kendalltau(est, lengths[300:]).statistic > 0.8
    assert np.median(np.abs(np.log(est) - np.log(lengths[300:]))) < 0.3


def test_probe_state_survives_a_restart_and_refuses_another_shape(tmp_path):
    probe = new_probe(tmp_path, min_observations=8)
    x, lengths = synthetic(128, 16, seed=1)
    for f, n in zip(x, lengths):
        probe.observe(f, n)                                    # saved every 64 observations
    assert (tmp_path / "probe.npz").exists()
    again = new_probe(tmp_path, min_observations=8)
    assert again.count == 128 and again.estimate(x[0]) == pytest.approx(probe.estimate(x[0]))
    reader = new_probe(tmp_path, min_observations=8, read_only=True)      # learns in memory, never writes
    for f, n in zip(x, lengths):
        reader.observe(f, n)
    assert reader.count == 256 and new_probe(tmp_path, min_observations=8).count == 128
    reader.learn = False                                                  # frozen
    reader.observe(x[0], 5000)
    assert reader.count == 256
    with pytest.raises(ValueError, match="learned on model"):
        new_probe(tmp_path, model="another-checkpoint")
    with pytest.raises(ValueError, match="another layer"):
        LengthProbe(64, layer=4, device=torch.device("cpu"), dtype=torch.float32, dims=16, path=tmp_path / "probe.npz")


def test_projection_reads_the_hidden_state_rows_it_is_given():
    probe = new_probe()
    h = torch.randn(5, 64)
    assert torch.allclose(probe.project(h)[2], probe.project(h[2:3])[0])
    assert probe.project(h).dtype == torch.float32 and probe.project(h).shape == (5, 16)


@pytest.fixture(scope="module")
def probe_engine(model_dir):
    return make_engine(model_dir)


def estimates_of(engine, prompts: dict[str, str], sampling: Sampling) -> tuple[dict, dict]:
    for job_id, text in prompts.items():
        engine.add(job_id, engine.tokenizer.encode(text), sampling)
    estimates, done, tokens = {}, {}, {}
    while engine.has_work:
        out = engine.step()
        estimates.update({e.job_id: e.output_tokens for e in out.estimates})
        for d in out.deltas:
            tokens.setdefault(d.job_id, []).extend(d.token_ids)
        done.update({j: (tokens[j], f) for j, f in out.finished})
    return estimates, done


def test_engine_learns_from_jobs_that_stopped_and_then_estimates_new_ones(probe_engine):
    engine = probe_engine
    engine.reset()
    hidden = engine.runner.hf.config.hidden_size
    engine.probe = LengthProbe(hidden, layer=engine.probe.layer, device=torch.device("cpu"),
                                                     dtype=torch.float32, dims=8, min_observations=4)
    # cut at max_tokens or run with ignore_eos: their lengths are censored, nothing is learned
    estimates, done = estimates_of(engine, {f"len-{i}": p for i, p in enumerate(PROMPTS)}, Sampling(max_tokens=3))
    assert not estimates and engine.probe.count == 0 and all(f is Finish.LENGTH for _, f in done.values())
    assert not engine.probe_features                            # forgotten with the jobs
    # a client's stop string cuts them: that length is the client's, not the model's, and teaches nothing
    estimates, done = estimates_of(engine, {f"cut-{i}": p for i, p in enumerate(PROMPTS)},
                                   Sampling(max_tokens=48, stop=(" ",)))
    assert all(f is Finish.STOP_STRING for _, f in done.values()) and engine.probe.count == 0
    # the model ends them itself (EOS; here its full stop stands in for EOS): each teaches the probe its length
    eos_ids, engine.eos_ids = engine.eos_ids, {*engine.eos_ids, *engine.tokenizer.encode(".")}
    try:
        estimates, done = estimates_of(engine, {f"stop-{i}": p for i, p in enumerate(PROMPTS)}, Sampling(max_tokens=48))
    finally:
        engine.eos_ids = eos_ids
    stopped = [j for j, (_, f) in done.items() if f is Finish.STOP]
    assert len(stopped) >= 3 and engine.probe.count == len(stopped)
    engine.probe.observe(np.zeros(8), 10)                       # make sure it has reached its minimum
    estimates, done = estimates_of(engine, {f"new-{i}": p for i, p in enumerate(PROMPTS)}, Sampling(max_tokens=4))
    assert set(estimates) == set(done) and all(v > 0 and np.isfinite(v) for v in estimates.values())
    # a resumed job (recompute: prompt + output so far) is not estimated again
    engine.add("resumed", engine.tokenizer.encode(PROMPTS[0]), Sampling(max_tokens=6), output_ids=[11, 12])
    assert not estimates_of(engine, {}, Sampling())[0]


def test_the_probe_does_not_change_the_tokens(model_dir, probe_engine):
    off = make_engine(model_dir, length_probe_layer=-2)
    assert off.probe is None
    probe_engine.reset()
    for engine in (probe_engine, off):
        for i, p in enumerate(PROMPTS):
            engine.add(f"p{i}", engine.tokenizer.encode(p), Sampling(max_tokens=12))
    assert run_to_end(probe_engine) == run_to_end(off)


def test_estimates_stay_finite_and_bad_features_teach_nothing():
    probe = new_probe(min_observations=8)
    x, lengths = synthetic(64, 16, seed=2)
    for f, n in zip(x, lengths):
        probe.observe(f, n)
    probe.observe(np.full(16, np.nan), 10)                      # e.g. a bf16 overflow upstream
    assert probe.count == 64 and probe.estimate(x[0]) is not None
    assert probe.estimate(np.full(16, np.nan)) is None
    huge = probe.estimate(x[0] * 1e6)                           # far outside what it learned: clipped, no overflow
    assert huge is None or 1 <= huge <= 2 ** 20


def test_a_job_preempted_by_recompute_keeps_its_features_and_a_one_token_prompt_is_read(probe_engine):
    engine = probe_engine
    engine.reset()
    engine.add("long", engine.tokenizer.encode(PROMPTS[2]), Sampling(max_tokens=40))
    engine.add("one", [engine.tokenizer.encode("Hi")[0]], Sampling(max_tokens=40))   # a one-token prompt
    for _ in range(4):
        engine.step()
    engine.flush()
    assert {"long", "one"} <= set(engine.probe_features)
    features = engine.probe_features["long"].copy()
    engine.preempt("long", PreemptMode.RECOMPUTE)
    assert "long" not in engine.probe_features
    engine.add("long", engine.tokenizer.encode(PROMPTS[2]), Sampling(max_tokens=40), output_ids=[11, 12])
    assert np.array_equal(engine.probe_features["long"], features)   # it can still teach the probe when it stops
    # review, session 23: a new request that reuses the id of a job preempted here (and ended elsewhere) took that
    # job's features, taught the probe another prompt's length with them and was estimated by them
    engine.preempt("long", PreemptMode.RECOMPUTE)
    engine.add("long", engine.tokenizer.encode(PROMPTS[1]), Sampling(max_tokens=40))
    assert "long" not in engine.probe_features                         # read from its own prompt when it runs
    engine.reset()


def test_a_step_that_reads_a_one_token_prompt_reports_itself_mixed(probe_engine):
    # the scheduler fits a fixed cost per mixed (eager) step: a probed one-token prompt forces that path
    engine = probe_engine
    engine.reset()
    engine.add("solo", [engine.tokenizer.encode("Hi")[0]], Sampling(max_tokens=3, ignore_eos=True))
    first = engine.step()
    assert first.shape.prefill_tokens == 0 and first.shape.mixed and "solo" in engine.probe_features
    assert not engine.step().shape.mixed                      # then a plain decode step
    engine.reset()


def test_a_probe_whose_file_cannot_be_written_goes_on_learning(tmp_path):
    """Review, session 23: the save (every SAVE_EVERY observations) runs inside an engine step, and a missing,
    read-only or full volume raised there: the whole step failed, every job on the worker with it, every 64 jobs."""
    from services.worker.length_probe import SAVE_EVERY

    probe = LengthProbe(64, layer=3, device=torch.device("cpu"), dtype=torch.float32, dims=16,
                        path=tmp_path / "missing-dir" / "probe.npz", min_observations=1)
    rng = np.random.default_rng(0)
    for i in range(SAVE_EVERY):
        probe.observe(rng.standard_normal(16), 10 + i)
    assert probe.count == SAVE_EVERY and probe.estimate(rng.standard_normal(16)) is not None


def test_a_save_that_fails_half_way_leaves_no_part_behind(tmp_path, monkeypatch):
    """A part written to a full volume must not keep its room (review of the mend above, session 23)."""
    import os

    probe = new_probe(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        probe.save(tmp_path / "probe.npz")
    assert list(tmp_path.iterdir()) == []
