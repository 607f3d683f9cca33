"""Where an engine step's time goes, and whether the GPU ever waits for the host (issue 9).

Run on the lent GPU (docs/BENCHMARKS.md has the command). Builds the Llama-3-8B-shaped engine with random
bf16 weights, then replays the ShareGPT lengths offline (all requests at once, ignore_eos):

- first run vs second run after start (the "slow first run");
- output tok/s at max batch 64 / 128 / 256 / 512 (same engine, the step scheduler's cap changed);
- per step: host time in each phase (plan, prepare + launch, sample launch, wait for the ids, collect:
  bookkeeping + detokenize + stop checks) and the GPU's idle time between steps. CUDA events are recorded
  where each step's work starts and ends on the stream; a gap between one step's end and the next one's
  start is time the GPU sat waiting for the host: the host time that is *not* hidden.

Wrapping the engine's methods adds a little host time of its own; the throughput runs are not wrapped.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

import services.worker.engine as engine_mod
from bench.engine_bench import LLAMA3_8B, log
from services.worker.config import WorkerConfig
from services.worker.factory import build_engine
from services.worker.model_runner import load_hf_model
from services.worker.sequence import Sampling


def add_requests(engine, pairs, vocab: int, tag: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for i, (n_in, n_out) in enumerate(pairs):
        engine.add(f"{tag}{i}", torch.randint(0, vocab, (n_in,), generator=gen).tolist(),
                   Sampling(max_tokens=n_out, ignore_eos=True))


def offline(engine, pairs, vocab: int, tag: str) -> dict:
    add_requests(engine, pairs, vocab, tag)
    torch.cuda.synchronize()
    t, produced, steps, batch = time.perf_counter(), 0, 0, []
    while engine.has_work:
        out = engine.step()
        produced += len(out.deltas)
        steps += 1
        batch.append(len(engine.sched.running))
    sec = time.perf_counter() - t
    return {"output_tokens": produced, "seconds": sec, "output_tokens_per_s": produced / sec, "steps": steps,
            "mean_running": statistics.mean(batch)}


class Phases:
    """Host seconds per phase (wrapped methods, no syncs) and CUDA events at each step's start and end."""

    def __init__(self, engine):
        self._undo: list = []
        self.host = collections.defaultdict(float)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []
        self._start = None
        runner = engine.runner
        self._wrap(engine.sched, "schedule", "plan")
        self._wrap(engine, "_collect", "collect (incl. wait)")
        self._wrap(engine_mod.LaunchedStep, "token_ids", "wait for sampled ids")
        forward, sample = runner.forward, engine_mod.sample

        def timed_forward(chunks, prev=None):
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            t = time.perf_counter()
            out = forward(chunks, prev)
            self.host["prepare + launch forward"] += time.perf_counter() - t
            self._rows = len(chunks)
            return out

        def timed_sample(*a):
            t = time.perf_counter()
            out = sample(*a)
            self.host["sample launch"] += time.perf_counter() - t
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end, self._rows))
            return out

        self._set(runner, "forward", timed_forward)
        self._set(engine_mod, "sample", timed_sample)

    def _set(self, obj, name, value) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name), name in obj.__dict__))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Put every wrapped method back (instance attributes removed, module / class ones reset)."""
        for obj, name, old, had in reversed(self._undo):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

    def _wrap(self, obj, name, label):
        f = getattr(obj, name)

        def g(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            self.host[label] += time.perf_counter() - t
            return r
        self._set(obj, name, g)

    def summary(self, wall: float, steps: int) -> dict:
        torch.cuda.synchronize()
        busy = [s.elapsed_time(e) / 1e3 for s, e, _ in self.events]
        gaps = [max(0.0, a[1].elapsed_time(b[0]) / 1e3) for a, b in zip(self.events, self.events[1:])]
        by_batch = collections.defaultdict(list)
        for (s, e, rows), gap in zip(self.events[1:], gaps):
            by_batch[next((b for b in (64, 128, 256, 512) if rows <= b), 10**9)].append((gap, s.elapsed_time(e) / 1e3))
        return {
            "steps": steps, "wall_s": wall,
            "host_s_per_phase": {k: v for k, v in self.host.items()},
            "host_ms_per_step": {k: 1e3 * v / steps for k, v in self.host.items()},
            "gpu_busy_s": sum(busy), "gpu_idle_between_steps_s": sum(gaps),
            "unhidden_host_share": sum(gaps) / wall,
            "unhidden_share_by_batch": {str(b): sum(g for g, _ in v) / sum(g + d for g, d in v)
                                        for b, v in sorted(by_batch.items())},
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("step_profile.json"))
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="*", default=[64, 128, 256, 512])
    p.add_argument("--profile-batch", type=int, nargs="*", default=[128, 256])
    a = p.parse_args()
    from transformers import LlamaConfig

    cfg = LlamaConfig(**LLAMA3_8B)
    pairs = json.loads(a.lengths.read_text())[: a.requests]
    t = time.perf_counter()
    hf = load_hf_model(None, torch.bfloat16, torch.device("cuda"), random_weights=True, config=cfg)
    engine = build_engine(WorkerConfig(device="cuda", dtype="bfloat16", max_batch=a.max_batch,
                                       token_budget=a.token_budget, num_host_blocks=0, max_model_len=4096), model=hf)
    res = {"device": torch.cuda.get_device_name(), "build_s": time.perf_counter() - t,
           "kv_tokens": engine.blocks.num_total * engine.blocks.block_size}
    log("built", res)
    for run in ("first", "second"):
        res[f"{run}_run"] = offline(engine, pairs, cfg.vocab_size, run)
        log(run, res[f"{run}_run"])
    res["by_max_batch"] = {}
    for b in a.batches:
        engine.sched.max_batch = b
        res["by_max_batch"][b] = offline(engine, pairs, cfg.vocab_size, f"b{b}_")
        log("max batch", b, res["by_max_batch"][b])
    res["profile"] = {}
    for b in a.profile_batch:
        engine.sched.max_batch = b
        phases = Phases(engine)
        add_requests(engine, pairs, cfg.vocab_size, f"p{b}_")
        t, steps = time.perf_counter(), 0
        while engine.has_work:
            engine.step()
            steps += 1
        res["profile"][b] = phases.summary(time.perf_counter() - t, steps)
        log("profile", b, json.dumps(res["profile"][b]))
        phases.restore()
    a.out.write_text(json.dumps(res, indent=2))
    log(f"\nfirst run {res['first_run']['output_tokens_per_s']:.0f} tok/s, second {res['second_run']['output_tokens_per_s']:.0f}")
    for b, r in res["by_max_batch"].items():
        log(f"max batch {b:>4}: {r['output_tokens_per_s']:>7.0f} tok/s, {r['steps']} steps, mean running {r['mean_running']:.0f}")
    for b, r in res["profile"].items():
        log(f"profile max batch {b}: unhidden host share {100 * r['unhidden_host_share']:.1f}%; by batch "
            + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in r["unhidden_share_by_batch"].items())
            + "; host ms/step " + ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms_per_step"].items()))


if __name__ == "__main__":
    main()
