"""What the pull by kind (services/predictor/kind_reliability.py) would have served for a run recorded without it
(`--no-kind-pull`, or a run from before session 39): each request's recorded prediction is remembered and pulled
as it arrives, and its true length recorded `--lag` requests later (as bench/online_learning_replay.py learns), by
the predictor's own KindReliability. Writes the pulled predictions for `bench.simulate --predictor replay
--predictions`, so a run's own predictions show what the pull does to its schedule.

    python -m bench.kind_pull_replay --dataset-path .bench-data/sharegpt_heldout_880.json \
        --tokenizer .bench-data/llama3-8b-shape docs/results/h100_chat_2026-12-07_s40/KP/alise@np-r44.csv.xz \
        --out pulled.csv

The pull moves a log median; a run records the prediction the scheduler was given, which this treats as one
(a constant factor of it moves nothing in the pull).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.kind_breakdown import asked_as_flagged, dataset_args, recorded, side_of
from bench.online_learning_replay import write_predictions
from bench.run_over_time import read_run
from services.predictor.kind_reliability import KindReliability


def pulled(predicted: np.ndarray, lengths: np.ndarray, side: np.ndarray, lag: int, chunk: int = 20) -> np.ndarray:
    """The predictions (tokens) as the pull would have served them, requests in arrival order: each chunk is
    remembered and pulled when it arrives; true lengths are learned once `lag` requests have arrived after them."""
    reliability = KindReliability()
    mu = np.log(np.maximum(np.asarray(predicted, dtype=np.float64), 1.0))
    keys = [str(i) for i in range(len(mu))]
    out = np.empty_like(mu)
    learned = 0
    for start in range(0, len(mu), chunk):
        if (upto := max(0, start - lag)) > learned:
            reliability.record(keys[learned:upto], side[learned:upto], lengths[learned:upto])
            learned = upto
        end = min(start + chunk, len(mu))
        reliability.remember(keys[start:end], mu[start:end])
        out[start:end] = reliability.pull(mu[start:end], side[start:end])
    return np.exp(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run's per-request CSV (`alise bench`), or it xz-compressed")
    dataset_args(p)
    p.add_argument("--lag", type=int, default=600, help="requests between a request's arrival and its length learned")
    p.add_argument("--out", type=Path, required=True, help="the pulled predictions, as bench.simulate reads them")
    a = p.parse_args(argv)
    if a.lag < 0:
        p.error("--lag must be >= 0 (a negative lag would learn a length before its prediction)")
    run = recorded(read_run(a.run))          # a failed request has no length: never learned, pulled all the same
    side = side_of(asked_as_flagged(p, a, len(run.asked)))
    write_predictions(a.out, pulled(run.predicted, run.lengths, side, a.lag), run.asked)
    print(f"{len(run.asked)} predictions pulled as served, lengths learned {a.lag} requests after arrival: {a.out}")


if __name__ == "__main__":
    main()
