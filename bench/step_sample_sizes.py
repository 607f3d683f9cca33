"""Decode-only steps of live runs by size, against a fitted step cost: where a run's steps run slower or faster than
the linear model says. Reads each run's `workers[0].step_sample` (alise bench) and a cost JSON
(bench.simulator.calibrate); prints, per run, the median of wall time over the model for steps of up to 360 rows,
361..max-batch rows and more than the batch (early jobs beside a full batch: the largest decode graph), and for all
runs pooled, the medians by finer row bins. Steps that ran eagerly (mixed, or a probed prompt) are left out.

    python -m bench.step_sample_sizes --cost docs/results/h100_chat_2026-12-06_s30/sim/cost_h100_s30.json \\
        --runs docs/results/h100_chat_2026-12-06_s30/L48/*.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.simulator.cost import load_cost

BINS = ((330, 360), (361, 384), (385, 400), (401, 416), (417, 424), (425, 432), (433, 440), (441, 448))


def decode_steps(path: Path) -> list[tuple[int, float, int]]:
    """(rows, wall seconds, context tokens) of a run's sampled single decode-only steps."""
    sample = json.loads(path.read_text())["workers"][0]["step_sample"]
    return [(seqs, seconds, context) for steps, seconds, seqs, prefill, context, mixed, *_ in sample
            if steps == 1 and not prefill and not mixed]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="live runs' JSON (alise bench)")
    p.add_argument("--cost", required=True, help="a fitted IterationCost JSON")
    p.add_argument("--max-batch", type=int, default=416)
    a = p.parse_args()
    cost = load_cost(a.cost)
    pooled = []
    for path in a.runs:
        by_size: dict[str, list[float]] = {}
        for rows, seconds, context in decode_steps(path):
            model = cost.step(rows, 0, context)
            size = "<=360" if rows <= 360 else f"361-{a.max_batch}" if rows <= a.max_batch else f">{a.max_batch}"
            by_size.setdefault(size, []).append(seconds / model)
            pooled.append((rows, seconds, model))
        print(path, {k: (len(v), round(statistics.median(v), 3)) for k, v in sorted(by_size.items())})
    for lo, hi in BINS:
        steps = [(s, m) for rows, s, m in pooled if lo <= rows <= hi]
        if steps:
            wall, model = (statistics.median(x) * 1e3 for x in zip(*steps))
            excess = statistics.median(s - m for s, m in steps) * 1e3
            print(f"{lo}-{hi} rows: {len(steps)} steps, wall {wall:.1f} ms, model {model:.1f} ms, "
                  f"wall - model {excess:+.2f} ms")


if __name__ == "__main__":
    main()
