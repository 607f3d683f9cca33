"""How long one engine iteration takes in the simulator, and where its constants come from.

An iteration runs every scheduled sequence once: decodes read their whole context (attention), prefill chunks
are compute-bound per token, and every step pays a fixed part (weights read once, launches, sampling) plus a
small part per sequence; a step with prefill chunks (mixed) pays a fixed extra: on a GPU a pure decode step
replays a CUDA graph while a mixed one launches its kernels one by one. So

    step = base + per_seq * sequences + per_prefill_token * prefill tokens + per_context_token * context read
           + per_mixed_step * (1 if the step has prefill chunks)
           + per_prefill_pair * query-key pairs of the prefill chunks' attention
           + over_batch_step * (1 if a decode-only step has more rows than the batch)

The pairs term is what a chat turn's history costs its prefill: a chunk of n new tokens after s cached ones
attends to n * s + n * (n + 1) / 2 pairs, which its n tokens and its s + n context leave out (each decode reads
its context once, a prefill chunk once per new token). Costs fitted before the worker counted pairs have it 0.

The last term is what the decode graph for more rows than the batch (early jobs beside a full batch) costs beyond
its rows: on the H100 of sessions 30 and 32, steps of 417-448 rows took ~3.5 ms (13%) more than the rest of the
model says, while those of 401-416 rows took 1.5 ms less (docs/BENCHMARKS.md, session 32). fcfs never has such
steps; alise's early rows make up to a third of its large ones.

Swapping a preempted job's KV to host memory (and back) costs `swap_per_token` per token each way.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class IterationCost:
    base_s: float
    per_seq_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_context_token_s: float = 0.0
    swap_per_token_s: float = 0.0
    per_mixed_step_s: float = 0.0
    over_batch_step_s: float = 0.0
    per_prefill_pair_s: float = 0.0
    source: str = ""                  # where the numbers come from

    def step(self, seqs: int, prefill_tokens: int, context_tokens: int, mixed: bool = False,
             over_batch: bool = False, prefill_pairs: int = 0) -> float:
        """One step; over_batch: a decode-only step with more rows than the worker's batch."""
        return (self.steps(1, seqs, prefill_tokens, context_tokens, int(mixed), prefill_pairs)
                + (self.over_batch_step_s if over_batch and not mixed else 0.0))

    def steps(self, steps: int, seqs: int, prefill_tokens: int, context_tokens: int, mixed_steps: int,
              prefill_pairs: int = 0) -> float:
        """Several steps summed (a load report's row, bench.simulator.calibrate's fitted rows)."""
        return (self.base_s * steps + self.per_seq_s * seqs + self.per_prefill_token_s * prefill_tokens
                + self.per_context_token_s * context_tokens + self.per_mixed_step_s * mixed_steps
                + self.per_prefill_pair_s * prefill_pairs)

    def to_json(self) -> dict:
        return asdict(self)


# Fitted by hand to docs/BENCHMARKS.md's measurements (see there for the runs). The H200 numbers: the served decode
# step at batch 1 / 64 and context 512 / 2048 (bench/decode_floor.py, 2026-12-02); prefill at ~33k tokens/s; KV
# of Llama-3-8B is 128 KiB per token, moved at ~25 GB/s.
PRESETS: dict[str, IterationCost] = {
    "h200-llama3-8b": IterationCost(base_s=4.71e-3, per_seq_s=1.1e-5, per_prefill_token_s=3.0e-5,
                                    per_context_token_s=2.6e-8, swap_per_token_s=5.2e-6,
                                    source="H200 decode_floor 2026-12-02 (served step), prefill estimate"),
    # The scheduler's default ExecTimeModel (rough CPU numbers for SmolLM2-135M) as an iteration cost.
    "cpu-smollm2": IterationCost(base_s=3.0e-2, per_seq_s=2.0e-3, per_prefill_token_s=1.0e-3,
                                 per_context_token_s=2.0e-6, swap_per_token_s=1.0e-6,
                                 source="ExecTimeModel defaults (uncalibrated)"),
}


def load_cost(spec: str) -> IterationCost:
    """A preset name; a JSON file with IterationCost's fields (bench.simulator.calibrate writes one); or a live
    sweep run's JSON (bench sweep), whose first worker's step model, as the scheduler learned it, is used."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--cost: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    data = json.loads(path.read_text())
    if "workers" in data:
        models = [w["step_model"] for w in data["workers"] if w.get("step_model")]
        if not models:
            raise SystemExit(f"--cost: {spec} has no learned step model (too few load reports?)")
        m = models[0]
        return IterationCost(base_s=m.get("base_s", 0.0), per_seq_s=m.get("per_seq_s", 0.0),
                             per_prefill_token_s=m.get("per_prefill_token_s", 0.0),
                             per_context_token_s=m.get("per_context_token_s", 0.0),
                             per_mixed_step_s=m.get("per_mixed_step_s", 0.0),
                             swap_per_token_s=PRESETS["cpu-smollm2"].swap_per_token_s,
                             source=f"learned live by the scheduler ({path.name})")
    return IterationCost(**data)
