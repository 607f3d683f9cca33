"""Fit the simulator's IterationCost to a real engine: time its steps in runs whose make-up is known, then solve
for the constants by non-negative least squares.

    python -m bench.simulator.calibrate --out cpu_cost.json [--device cuda --model-dir DIR ...]

Two kinds of runs, each on fresh random prompts (distinct, so the prefix cache cannot skip work):
- prefill: one sequence with a P-token prompt; its first step computes P tokens (P within the token budget);
- decode: B sequences with L-token prompts, timed once they all decode: B sequences, context ~ B x (L + generated).

Or (`--replay LENGTHS.json --rate R`) the workload the simulator will run: requests with the file's (prompt,
output) lengths arrive at R per second (Poisson, in wall time) and the engine serves them as a worker would, with
ignore_eos; every step of the whole run is a sample (its shape as the engine reports it to the scheduler, its
seconds as the engine's step call took them). This measures the mix of steps that serving makes (mixed steps
with prefill chunks beside hundreds of decodes), which the controlled runs above do not reach.

    python -m bench.simulator.calibrate --replay lengths.json --rate 35 --num-prompts 1500 --out cost.json \
        --device cuda --model-dir DIR --worker-arg dtype=bfloat16 --worker-arg random_weights=True

Or (`--from-runs RUN.json ...`) no engine at all: the steps live benchmark runs already served, as their scheduler
sampled them (`alise bench` saves each worker's `step_sample`, a uniform sample of the steps it reported): the
serving mix of the machine the runs ran on, at no extra device time.

    python -m bench.simulator.calibrate --from-runs out/sweep/fcfs-r42.json out/sweep/alise-r42.json --out cost.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.simulator.cost import IterationCost
from services.common.attention_pairs import prefill_pairs


@dataclass(frozen=True)
class StepRow:
    """One engine step, or several summed, as fitted: its make-up and its time (a live run's sampled row, or one
    timed here)."""
    steps: int
    seconds: float
    seqs: int
    prefill_tokens: int
    context_tokens: int
    mixed_steps: int
    device_seconds: float = 0.0    # a GPU worker's device time for it (0: not timed so)
    prefill_pairs: int = 0         # query-key pairs of its prefill attention (services/worker/engine.py StepShape)

    @classmethod
    def sampled(cls, values: list) -> "StepRow":
        """A row of a run's step_sample, in bench/serve.py's STEP_SAMPLE_COLUMNS order (runs saved before the later
        columns existed have fewer: those count as not measured, 0)."""
        return cls(*values)

    @classmethod
    def timed(cls, seqs: int, prefill_tokens: int, context_tokens: int, seconds: float,
              prefill_pairs: int) -> "StepRow":
        """One step this module ran and timed."""
        return cls(1, seconds, seqs, prefill_tokens, context_tokens, int(prefill_tokens > 0), 0.0, prefill_pairs)

    def features(self) -> list[float]:
        """Its column of each fitted constant, in IterationCost.steps's order."""
        return [self.steps, self.seqs, self.prefill_tokens, self.context_tokens, self.mixed_steps, self.prefill_pairs]


def _prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def prefill_samples(engine, rng, vocab: int, prompt_lens: list[int], reps: int) -> list[StepRow]:
    from services.worker.sequence import Sampling

    out = []
    for p in prompt_lens:
        for r in range(reps):
            engine.add(f"prefill-{p}-{r}", _prompt(rng, vocab, p), Sampling(max_tokens=1, ignore_eos=True))
            started = time.perf_counter()
            while engine.has_work:
                engine.step()
            out.append(StepRow.timed(1, p, p, time.perf_counter() - started, prefill_pairs(0, p)))
    return out


def decode_samples(engine, rng, vocab: int, batches: list[int], prompt_lens: list[int], steps: int) -> list[StepRow]:
    from services.worker.sequence import Sampling

    out = []
    for b in batches:
        for p in prompt_lens:
            ids = [f"decode-{b}-{p}-{i}" for i in range(b)]
            for job in ids:
                engine.add(job, _prompt(rng, vocab, p), Sampling(max_tokens=steps + 4, ignore_eos=True))
            generated = {job: 0 for job in ids}
            while min(generated.values()) < 2:                    # every prefill done, every sequence decoding
                for d in engine.step().deltas:
                    generated[d.job_id] += len(d.token_ids)
            for _ in range(steps):
                context = sum(p + g for g in generated.values())
                started = time.perf_counter()
                res = engine.step()
                seconds = time.perf_counter() - started
                if sum(len(d.token_ids) for d in res.deltas) == b:  # a full decode step (none finished or joined)
                    out.append(StepRow.timed(b, 0, context, seconds, 0))
                for d in res.deltas:
                    generated[d.job_id] += len(d.token_ids)
            while engine.has_work:
                engine.step()
    return out


def replay_samples(engine, rng, vocab: int, lengths: list[tuple[int, int]], rate: float, seed: int) -> list[StepRow]:
    """Serve `lengths` arriving at `rate` per second; one sample per engine step of the whole run."""
    from bench.serve import arrival_offsets
    from services.worker.sequence import Sampling

    arrivals = arrival_offsets(len(lengths), rate, 1.0, seed)
    out, i, started = [], 0, time.perf_counter()
    while i < len(lengths) or engine.has_work:
        now = time.perf_counter() - started
        while i < len(lengths) and arrivals[i] <= now:
            prompt_len, output_len = lengths[i]
            engine.add(f"replay-{i}", _prompt(rng, vocab, prompt_len), Sampling(max_tokens=output_len, ignore_eos=True))
            i += 1
        if not engine.has_work:
            time.sleep(min(0.01, max(0.0, arrivals[i] - now)))
            continue
        res = engine.step()
        if res.seconds and res.shape is not None:
            s = res.shape
            out.append(StepRow.timed(s.seqs, s.prefill_tokens, s.context_tokens, res.seconds, s.prefill_pairs))
    return out


def replay_lengths(a: argparse.Namespace) -> list[tuple[int, int]]:
    lengths = [(int(p), int(o)) for p, o in json.loads(a.replay.read_text())]
    lengths = [(p, o) for p, o in lengths[:a.num_prompts or None] if p > 0 and o > 0]
    if not lengths or not 0 < a.rate < float("inf"):
        raise SystemExit("--replay needs at least one request with a prompt and an output, and a --rate > 0")
    return lengths


def fit(rows: list[StepRow], swap_per_token_s: float = 0.0, source: str = "") -> IterationCost:
    """seconds ~ base + per_seq * seqs + per_prefill_token * prefill + per_context_token * context
    + per_mixed_step * (prefill > 0) + per_prefill_pair * prefill attention's pairs, all >= 0, over rows of one
    step or several summed: the base counts once a step, the mixed term once a mixed step. Rows without their
    pairs (runs saved before the worker counted them) fit that constant as 0."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([row.features() for row in rows], float)
    y = np.array([row.seconds for row in rows], float)
    scale = np.maximum(a.max(axis=0), 1e-12)    # columns of similar size for a well-conditioned solve (none all 0)
    coef, _ = nnls(a / scale, y)
    base, per_seq, per_prefill, per_context, per_mixed, per_pair = (float(c) for c in coef / scale)
    return IterationCost(base_s=base, per_seq_s=per_seq, per_prefill_token_s=per_prefill,
                         per_context_token_s=per_context, per_mixed_step_s=per_mixed, per_prefill_pair_s=per_pair,
                         swap_per_token_s=swap_per_token_s, source=source)


def host_gap_per_step(paths: list[Path]) -> float:
    """The device's wait for the host between steps, per step, over these runs (each worker's `step_times`:
    `device_s.waited` over `steps`): what a device-time fit leaves out of the time a run takes."""
    waited = steps = 0.0
    for path in paths:
        for worker in json.loads(path.read_text()).get("step_times", {}).values():
            if worker.get("device_s", {}).get("waited") is not None and worker.get("steps"):
                waited += worker["device_s"]["waited"]
                steps += worker["steps"]
    if not steps:
        raise SystemExit("--host-gaps: no run has its worker's device waits (runs of a CPU worker, or saved before "
                         "step_times carried them)")
    return waited / steps


def device_time_rows(rows: list[StepRow]) -> list[StepRow]:
    """The sampled rows with the device's seconds in place of the wall time (rows a GPU worker timed only)."""
    timed = [replace(row, seconds=row.device_seconds) for row in rows if row.device_seconds > 0]
    if not timed:
        raise SystemExit("--device-time: no sampled step has a device time (runs of a CPU worker, or saved before "
                         "samples carried it)")
    return timed


PAIRS_COLUMN = 8        # a sampled row's columns once it counts its prefill attention's pairs (STEP_SAMPLE_COLUMNS)
MIN_OF_EACH = 30        # mixed and decode-only steps a fit from samples wants at least, to tell their terms apart


def counts_pairs(sample: list[list], rows: list[StepRow]) -> bool:
    """Whether a run's worker counted its prefill attention's pairs: every sampled row has the column, and a run
    with prefill shows some (a worker that counts them reports at least a prefill chunk's tokens; a client newer than
    the worker would write the column as zeros)."""
    if not all(len(values) >= PAIRS_COLUMN for values in sample):
        return False
    return any(row.prefill_pairs > 0 for row in rows) or not any(row.prefill_tokens > 0 for row in rows)


def run_rows(paths: list[Path]) -> list[StepRow]:
    """Every worker's step sample in these live runs' JSON (`alise bench`; runs from before it was saved have
    none: refused, naming the file)."""
    rows, counted = [], {}
    for path in paths:
        run = json.loads(path.read_text())
        sample = [row for w in run.get("workers", []) for row in w.get("step_sample", [])]
        if not sample:
            raise SystemExit(f"--from-runs: {path} has no step_sample (a run saved before the scheduler kept one?)")
        kept = [row for row in map(StepRow.sampled, sample) if row.steps >= 1 and row.seconds > 0]   # as the scheduler
        counted[str(path)] = counts_pairs(sample, kept)
        rows += kept
    if len(set(counted.values())) > 1:
        # an older run's prefill steps would count as attending to nothing: the pairs' constant would come out low
        raise SystemExit("--from-runs: some runs count their steps' prefill attention pairs and some do not (saved "
                         f"before the worker counted them: {', '.join(n for n, c in counted.items() if not c)}); "
                         "fit each kind apart")
    mixed = sum(1 for row in rows if row.mixed_steps)
    if min(mixed, len(rows) - mixed) < MIN_OF_EACH:
        # a uniform sample of a decode-heavy run may hold few mixed steps (or of a prefill-heavy one, few pure
        # decodes): the mixed term, and prefill's, then rest on too few rows to be told from the base
        print(f"--from-runs: only {mixed} mixed and {len(rows) - mixed} decode-only steps sampled: the mixed-step "
              f"and prefill terms are poorly determined; add runs with more of the fewer kind", file=sys.stderr)
    return rows


def report(cost: IterationCost, rows: list[StepRow], out: Path) -> None:
    """Write the fit and say how well it explains the steps it was fitted to."""
    out.write_text(json.dumps(cost.to_json(), indent=2))
    predicted = [cost.steps(*row.features()) for row in rows]
    measured = [row.seconds for row in rows]
    errors = sorted(abs(p - m) / m for p, m in zip(predicted, measured))
    print(json.dumps(cost.to_json(), indent=2))
    # what the simulator's accuracy rests on is the sum (the run's length); single steps are noisy
    print(f"{len(rows)} steps fitted; relative error per step: median {errors[len(errors) // 2]:.0%}, worst "
          f"{errors[-1]:.0%}; all of them {sum(predicted):.2f} s modelled vs {sum(measured):.2f} s measured -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-runs", nargs="+", type=Path, help="live runs' JSON: fit to their step samples, no engine")
    p.add_argument("--device-time", action="store_true",
                   help="--from-runs: fit the GPU's time running each step (its samples' device_seconds) instead of "
                        "the engine's wall time, which the host's work between steps partly hides")
    p.add_argument("--host-gaps", action="store_true",
                   help="with --device-time: add the runs' mean wait of the device for the host per step to the base "
                        "(the device's timeline: its steps and the gaps between them)")
    p.add_argument("--model-dir", help="default: the local SmolLM2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker-arg", action="append", default=[], help="WorkerConfig field=value (repeat)")
    p.add_argument("--prefill-lens", nargs="+", type=int, default=[32, 128, 384])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--decode-prompt-lens", nargs="+", type=int, default=[32, 256])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--swap-per-token-s", type=float, default=1.0e-6)
    p.add_argument("--replay", type=Path, help="JSON list of [prompt tokens, output tokens]: serve it instead")
    p.add_argument("--rate", type=float, default=10.0, help="--replay: requests per second (Poisson)")
    p.add_argument("--num-prompts", type=int, default=0, help="--replay: this many from the file (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.host_gaps and not a.device_time:
        raise SystemExit("--host-gaps goes with --device-time (the wall time already holds the gaps)")
    if a.from_runs:
        rows = run_rows(a.from_runs)
        if a.device_time:
            rows = device_time_rows(rows)
        names = ", ".join(path.name for path in a.from_runs)
        timed = "device time of " if a.device_time else ""
        cost = fit(rows, a.swap_per_token_s, source=f"fitted to the {timed}{len(rows)} sampled steps of {names}")
        if a.host_gaps:
            gap = host_gap_per_step(a.from_runs)
            cost = replace(cost, base_s=cost.base_s + gap, source=f"{cost.source}, and {gap * 1e3:.3f} ms a step "
                                                                   "of the device waiting for the host")
        report(cost, rows, a.out)
        return
    lengths = replay_lengths(a) if a.replay else []       # checked before the model is built

    from services.common.model_paths import default_model_dir
    from services.worker.config import WorkerConfig
    from services.worker.factory import build_engine

    fields = dict(kv.split("=", 1) for kv in a.worker_arg)
    cfg = WorkerConfig(model_dir=a.model_dir or str(default_model_dir()), device=a.device,
                       **{k: type(getattr(WorkerConfig, k, ""))(v) for k, v in fields.items()})
    engine = build_engine(cfg)
    vocab = engine.vocab_size
    rng = random.Random(0)
    prefill_samples(engine, rng, vocab, [16], 1)                 # warm-up, not fitted
    if a.replay:
        samples = replay_samples(engine, rng, vocab, lengths, a.rate, a.seed)
    else:
        samples = (prefill_samples(engine, rng, vocab, a.prefill_lens, a.reps)
                   + decode_samples(engine, rng, vocab, a.batches, a.decode_prompt_lens, a.steps))
    cost = fit(samples, a.swap_per_token_s, source=f"fitted to {len(samples)} steps of {cfg.model_dir} on {a.device}")
    report(cost, samples, a.out)


if __name__ == "__main__":
    main()
