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

from bench.kind_breakdown import asked_as_flagged, dataset_args, request_kinds
from bench.online_learning_replay import write_predictions
from bench.run_over_time import read_run
from services.predictor.kind_reliability import RequestKind


def with_truth_for(results: list, kinds: list[RequestKind], kind: RequestKind) -> tuple[list[float], list[int]]:
    """(predictions, lengths asked) by request index: the run's own predictions, the truth for `kind`'s requests."""
    num = max(r.index for r in results) + 1
    predicted, asked = [0.0] * num, [0] * num
    for r in results:
        true = r.ok and kinds[r.index] is kind
        predicted[r.index] = r.output_tokens if true else r.predicted_output_tokens
        asked[r.index] = r.expected_output_tokens              # what bench.simulate checks the workload by
    return predicted, asked


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run's per-request CSV (`alise bench`), or it xz-compressed")
    dataset_args(p)
    p.add_argument("--kind", type=RequestKind, choices=list(RequestKind), required=True,
                   help="the kind whose predictions become the true lengths")
    p.add_argument("--out", type=Path, required=True, help="the predictions, as bench.simulate reads them")
    a = p.parse_args(argv)
    results = read_run(a.run)
    num = max(r.index for r in results) + 1
    kinds = request_kinds(asked_as_flagged(p, a, num))
    predicted, asked = with_truth_for(results, kinds, a.kind)
    write_predictions(a.out, predicted, asked)
    print(f"{num} predictions, {a.kind.value}'s the true lengths: {a.out}")


if __name__ == "__main__":
    main()
