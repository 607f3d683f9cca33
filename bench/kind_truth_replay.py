"""Where the ranking loses, by kind of request: a run's recorded predictions with one kind's (a conversation's first
message, a later turn) replaced by their true lengths. Replayed by `bench.simulate --predictor replay --predictions`,
it shows how much of alise's gap to the oracle that kind's ranking holds (session 41: on a chat3000 run at 44
req/s the later turns held nearly all of it).

    python -m bench.kind_truth_replay --dataset-path .bench-data/sharegpt_heldout_880.json \
        --tokenizer .bench-data/llama3-8b-shape docs/results/h100_chat_2026-12-07_s41/AG/alise@ag45-r44.csv.xz \
        --kind later_turn --out later_true.csv

A request that failed keeps its recorded prediction (it has no true length).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.kind_breakdown import Recorded, asked_as_flagged, dataset_args, recorded, request_kinds
from bench.online_learning_replay import write_predictions
from bench.run_over_time import read_run
from services.predictor.kind_reliability import RequestKind


def with_truth_for(run: Recorded, kinds: list[RequestKind], kind: RequestKind) -> np.ndarray:
    """The run's own predictions by request index, the true length for `kind`'s requests that have one."""
    made_true = np.array([k is kind for k in kinds]) & (run.lengths > 0)
    return np.where(made_true, run.lengths, run.predicted)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run's per-request CSV (`alise bench`), or it xz-compressed")
    dataset_args(p)
    p.add_argument("--kind", type=RequestKind, choices=list(RequestKind), required=True,
                   help="the kind whose predictions become the true lengths")
    p.add_argument("--out", type=Path, required=True, help="the predictions, as bench.simulate reads them")
    a = p.parse_args(argv)
    run = recorded(read_run(a.run))
    kinds = request_kinds(asked_as_flagged(p, a, len(run.asked)))
    write_predictions(a.out, with_truth_for(run, kinds, a.kind), run.asked)
    print(f"{len(run.asked)} predictions, {a.kind.value}'s the true lengths: {a.out}")


if __name__ == "__main__":
    main()
